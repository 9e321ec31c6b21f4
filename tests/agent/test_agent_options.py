"""The agent's command line: the autostarted agent's one argument is read without
building the argparse parser (a cold start's few milliseconds), to the same result."""

from __future__ import annotations

import subprocess
import sys

import pytest

from compozy_agent.__main__ import build_parser, parse_options


def test_the_autostarted_command_line_is_parsed_as_the_parser_would() -> None:
    shortcut = parse_options(["--autostarted"])
    assert vars(shortcut) == vars(build_parser().parse_args(["--autostarted"]))


@pytest.mark.parametrize("args", [["--autostarted", "-v"], ["-v"], [], ["--daemon"],
                                  ["--autostarted", "--idle-timeout", "3"]])
def test_any_other_command_line_goes_through_the_parser(args: list[str]) -> None:
    assert vars(parse_options(args)) == vars(build_parser().parse_args(args))


def test_the_shortcut_loads_none_of_what_the_parser_needs() -> None:
    script = ("import sys; from compozy_agent.__main__ import parse_options; "
              "parse_options(['--autostarted']); "
              "print(sorted(m for m in ('locale', 'shutil', 'lzma') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
