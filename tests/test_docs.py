"""The documents' claims point at tests that exist.

docs/security.md ties each claim to the test that performs the attack. A
renamed or deleted test would leave a claim that nothing holds up, so every
test name and test file the document cites must be found in the suite.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
SECURITY = ROOT / "docs" / "security.md"

# `test_name` or `TestClass` in backticks; a path like `tests/agent/test_x.py` is a file citation.
_CITED_TEST = re.compile(r"`((?:test_|Test)[A-Za-z0-9_]+)`")
_CITED_FILE = re.compile(r"`(tests/[A-Za-z0-9_/.]+\.py)`")


def _defined_test_names() -> set[str]:
    names: set[str] = set()
    for path in TESTS.rglob("test_*.py"):
        if "node_modules" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):  # e.g. a hypothesis state machine's TestCase
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def cited_tests(text: str) -> set[str]:
    return set(_CITED_TEST.findall(text))


def cited_files(text: str) -> set[str]:
    return set(_CITED_FILE.findall(text))


def test_every_test_security_md_cites_exists() -> None:
    text = SECURITY.read_text(encoding="utf-8")
    cited = cited_tests(text)
    assert len(cited) >= 20, "docs/security.md should cite its tests by name"
    missing = sorted(cited - _defined_test_names())
    assert not missing, f"docs/security.md cites tests that do not exist: {missing}"


def test_every_test_file_security_md_cites_exists() -> None:
    text = SECURITY.read_text(encoding="utf-8")
    missing = sorted(name for name in cited_files(text) if not (ROOT / name).is_file())
    assert not missing, f"docs/security.md cites test files that do not exist: {missing}"


def test_the_citation_check_sees_a_missing_name() -> None:
    # The check above must be able to fail: a made-up name is not among the defined ones.
    text = "Test: `test_this_test_does_not_exist_anywhere` and `tests/agent/nope.py`."
    assert cited_tests(text) - _defined_test_names() == {"test_this_test_does_not_exist_anywhere"}
    assert cited_files(text) == {"tests/agent/nope.py"}
