"""Shared fixtures. Each real part has its fixture module under tests/support/."""

from __future__ import annotations

pytest_plugins: list[str] = ["support.agent"]
