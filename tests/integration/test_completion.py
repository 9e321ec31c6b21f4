"""Shell completion (issue 15, item 3): the scripts `compozy completion SHELL` and
`compozy-agent completion SHELL` print, loaded by the real bash, zsh and fish.

bash: the script is sourced and its function called as readline would
(COMP_WORDS, COMP_CWORD); zsh: an interactive `zsh -f` in tmux, Tab pressed;
fish: `complete -C`. Profile names and token ids come from a running agent
(never started for a Tab) and the config file.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.agent import AgentEnv, AgentProcess, run_cli, start_agent
from support.real_parts import require_tools
from support.terminal import Terminal

AUTH_RE = ["refresh", "revoke", "revoke-all"]


def wrappers(directory: Path) -> Path:
    """A bin directory with `compozy` and `compozy-agent` as this checkout's Python runs
    them (the scripts call them by name, from PATH)."""
    directory.mkdir(exist_ok=True)
    for name, code in (("compozy", "from compozy_client.cli import main; main()"),
                       ("compozy-agent", "import sys; from compozy_agent.__main__ import main; "
                                         "sys.exit(main())")):
        path = directory / name
        path.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c "
                        f"{shlex.quote(code)} \"$@\"\n")
        path.chmod(0o755)
    return directory


@pytest.fixture
def shell_env(agent_env: AgentEnv, tmp_path: Path) -> dict[str, str]:
    env = agent_env.env()
    env["PATH"] = f"{wrappers(tmp_path / 'bin')}:/usr/bin:/bin"
    return env


def completion_script(prog: str, shell: str, env: dict[str, str], directory: Path) -> Path:
    result = subprocess.run([prog, "completion", shell], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    path = directory / f"{prog}.{shell}"
    path.write_text(result.stdout)
    return path


def bash_complete(env: dict[str, str], directory: Path, *words: str,
                  prog: str = "compozy") -> list[str]:
    """What the sourced bash script puts in COMPREPLY for ``prog words...`` (the last
    word is the one being completed)."""
    (bash,) = require_tools(("bash",), "bash", "to load the bash completion script")
    script = completion_script(prog, "bash", env, directory)
    function = f"_{prog.replace('-', '_')}_complete"
    line = (f"source {shlex.quote(str(script))}\n"
            f"COMP_WORDS=({shlex.join([prog, *words])}); COMP_CWORD={len(words)}\n"
            f"{function}\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    result = subprocess.run([bash, "--norc", "--noprofile", "-c", line], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    return [word for word in result.stdout.split("\n") if word]


def fish_complete(env: dict[str, str], directory: Path, line: str,
                  prog: str = "compozy") -> list[str]:
    """The candidates fish offers for ``line`` (`complete -C`), without descriptions."""
    (fish,) = require_tools(("fish",), "fish", "to load the fish completion script")
    script = completion_script(prog, "fish", env, directory)
    result = subprocess.run(
        [fish, "--no-config", "-c", f"source {shlex.quote(str(script))}; "
         f"complete -C {shlex.quote(line)}"],
        capture_output=True, text=True, env={**env, "HOME": str(directory)}, timeout=60)
    assert result.returncode == 0, result.stderr
    return [entry.split("\t")[0] for entry in result.stdout.splitlines()]


def test_bash_completes_commands_and_options(shell_env: dict[str, str], tmp_path: Path) -> None:
    assert bash_complete(shell_env, tmp_path, "auth", "re") == AUTH_RE
    assert "completion" in bash_complete(shell_env, tmp_path, "")
    assert bash_complete(shell_env, tmp_path, "login", "--dev") == ["--device"]
    assert bash_complete(shell_env, tmp_path, "completion", "") == ["bash", "zsh", "fish"]


def test_fish_completes_commands_and_options(shell_env: dict[str, str], tmp_path: Path) -> None:
    assert sorted(fish_complete(shell_env, tmp_path, "compozy auth re")) == AUTH_RE
    assert fish_complete(shell_env, tmp_path, "compozy auth token --min") == ["--min-valid"]
    assert "completion" in fish_complete(shell_env, tmp_path, "compozy ")


def test_zsh_completes_on_tab(shell_env: dict[str, str], tmp_path: Path) -> None:
    (zsh,) = require_tools(("zsh",), "zsh", "to load the zsh completion script")
    script = completion_script("compozy", "zsh", shell_env, tmp_path)
    env = {**shell_env, "HOME": str(tmp_path), "TERM": "xterm-256color", "PS1": "> "}
    with Terminal(tmp_path, [zsh, "-f", "-i"], env) as terminal:
        terminal.send_keys(f"autoload -U compinit; compinit -u -D; source {script}; "
                           "echo loaded-$((40+2))", "Enter")
        assert terminal.wait_for("loaded-42"), terminal.output
        terminal.send_keys("compozy auth re", "Tab")
        assert terminal.wait_for("revoke-all"), terminal.output
        screen = terminal.screen()
        terminal.send_keys("C-u", "exit", "Enter")
        assert terminal.exit_status() is not None
    listed = screen.split("compozy auth re", 1)[1]
    for command in AUTH_RE:
        assert command in listed, screen
    assert "Revoke a specific token" in listed  # zsh shows each command's help


def test_bash_keeps_the_value_after_an_equals_sign(shell_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    # bash splits `--profile=st` into `--profile`, `=`, `st` (COMP_WORDBREAKS).
    write_config(shell_env, "staging")
    assert bash_complete(shell_env, tmp_path, "login", "--profile", "=", "st") == ["staging"]
    assert bash_complete(shell_env, tmp_path, "login", "--profile", "=") == ["staging"]


def write_config(env: dict[str, str], *profiles: str) -> None:
    config = Path(env["HOME"]) / ".compozy" / "config.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("profiles:\n" + "".join(
        f"  {name}:\n    issuer: https://auth.example.test\n" for name in profiles))


def store_api_key(agent_env: AgentEnv, profile: str) -> None:
    result = run_cli(agent_env, "login", "--with-api-key", "--profile", profile,
                     input=f"key-for-{profile}-0123456789\n")
    assert result.returncode == 0, result.stderr


@pytest.fixture
def agent(agent_env: AgentEnv) -> Iterator[AgentProcess]:
    process = start_agent(agent_env)
    try:
        yield process
    finally:
        process.stop()


def test_profiles_and_token_ids_come_from_the_agent_and_the_config(
    agent: AgentProcess, shell_env: dict[str, str], tmp_path: Path
) -> None:
    env = agent.agent_env
    write_config(shell_env, "default", "staging")
    store_api_key(env, "ops")  # a profile the config file does not name: the agent's
    store_api_key(env, "ci")
    sessions = json.loads(run_cli(env, "auth", "list", "--json").stdout)["sessions"]
    token_ids = sorted(s["token_id"] for s in sessions)
    assert len(token_ids) == 2
    assert sorted(bash_complete(shell_env, tmp_path, "auth", "revoke", "")) == token_ids
    assert sorted(fish_complete(shell_env, tmp_path, "compozy auth revoke ")) == token_ids
    profiles = bash_complete(shell_env, tmp_path, "login", "--profile", "")
    assert sorted(profiles) == ["ci", "default", "ops", "staging"]
    assert bash_complete(shell_env, tmp_path, "auth", "token", "--profile", "o") == ["ops"]


def test_a_tab_never_starts_an_agent(shell_env: dict[str, str], tmp_path: Path,
                                     agent_env: AgentEnv) -> None:
    write_config(shell_env, "staging")
    assert "COMPOZY_AGENT_AUTOSTART" not in shell_env  # starting would be allowed
    # No agent: the config's profiles, no token ids, and no agent started.
    assert bash_complete(shell_env, tmp_path, "login", "--profile", "") == ["staging"]
    assert "revoke" not in bash_complete(shell_env, tmp_path, "auth", "revoke", "")
    assert not os.path.exists(agent_env.socket)


def test_unsafe_values_are_never_offered(shell_env: dict[str, str], tmp_path: Path) -> None:
    # The scripts insert values unquoted: a profile name that is shell syntax is left out.
    write_config(shell_env, "good", "'$(touch pwned)'")
    assert bash_complete(shell_env, tmp_path, "login", "--profile", "") == ["good"]


def test_the_agent_completes_its_options(shell_env: dict[str, str], tmp_path: Path) -> None:
    assert bash_complete(shell_env, tmp_path, "--for", prog="compozy-agent") == [
        "--forward-socket", "--forward-profile"]
    assert bash_complete(shell_env, tmp_path, "install", prog="compozy-agent") == [
        "install-service"]
    assert bash_complete(shell_env, tmp_path, "install-service", "--", prog="compozy-agent") \
        == ["--help", "--now"]
    assert "--daemon" in fish_complete(shell_env, tmp_path, "compozy-agent --d",
                                       prog="compozy-agent")
    # Hidden options stay hidden.
    assert "--autostarted" not in bash_complete(shell_env, tmp_path, "--", prog="compozy-agent")


def test_completion_help_has_examples(shell_env: dict[str, str]) -> None:
    for prog in ("compozy", "compozy-agent"):
        result = subprocess.run([prog, "completion", "--help"], capture_output=True, text=True,
                                env=shell_env, timeout=60)
        assert result.returncode == 0 and "examples:" in result.stdout, result
        assert "source <(" in result.stdout
        bad = subprocess.run([prog, "completion", "tcsh"], capture_output=True, text=True,
                             env=shell_env, timeout=60)
        assert bad.returncode == 2 and "invalid choice" in bad.stderr, bad
