"""The rule for real parts (DEVELOPERS.md): missing in CI fails the run, elsewhere it skips."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tools(tools: tuple[str, ...], packages: str, purpose: str) -> list[str]:
    """The paths of ``tools``; if one is missing, fail under CI=true, else skip, naming
    the Debian ``packages`` that provide them."""
    paths = [shutil.which(tool) for tool in tools]
    missing = [tool for tool, path in zip(tools, paths, strict=True) if path is None]
    if missing:
        message = f"needs {', '.join(missing)} (Debian packages {packages}) {purpose}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return [path for path in paths if path is not None]
