"""The printing every command shares: messages on stderr, data on stdout.

Messages are one escaped line each (agent messages quote provider text); colour
only on a terminal and without ``NO_COLOR`` (https://no-color.org). Imports
only os and sys at load time.
"""

from __future__ import annotations

import os
import sys

# No typing import at run time: see compozy_client/__init__.py.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def color(code: str, text: str, stream: Any) -> str:
    if os.environ.get("NO_COLOR") or not stream.isatty():
        return text
    return f"\033[{code}m{text}\033[0m"


#: The longest message printed; a login URL of many scopes still fits.
MESSAGE_LIMIT = 16384


def _one_line(message: str) -> str:
    """Agent messages quote provider text: print none of its control characters raw
    (a newline would forge a line, an escape sequence would drive the terminal)."""
    from compozy_client.safetext import one_line

    return one_line(message, MESSAGE_LIMIT)


def error(message: str) -> None:
    print(f"{color('31;1', 'error:', sys.stderr)} {_one_line(message)}", file=sys.stderr)


def warn(message: str) -> None:
    print(f"{color('33', 'warning:', sys.stderr)} {_one_line(message)}", file=sys.stderr)


def info(message: str) -> None:
    print(_one_line(message), file=sys.stderr)


def report(exc: Exception) -> None:
    from compozy_client.errors import AgentError, AgentTimedOut, AgentUnavailable

    error(str(exc))
    if isinstance(exc, AgentError) and exc.details.get("command"):
        info(f"  run: {exc.details['command']}")
    elif isinstance(exc, AgentTimedOut):
        # The agent is there and took the request: asking whether it may start is wrong.
        info("  it answers in time whenever it is only waiting for the provider, so it may "
             "be stuck; see: compozy auth status")
    elif isinstance(exc, AgentUnavailable):
        info("  is the agent allowed to start? (COMPOZY_AGENT_AUTOSTART=0 stops the CLI from "
             "starting one); start it by hand with `compozy-agent`")


def print_json(value: Any) -> None:
    import msgspec

    from compozy_client.safetext import json_bytes

    # JSON leaves DEL, C1 and bidi overrides raw; escaped, they cannot drive a terminal.
    encoded = json_bytes(msgspec.json.format(msgspec.json.encode(value), indent=2))
    sys.stdout.write(encoded.decode() + "\n")


def token_binding(session: Any, short: bool = False) -> str:
    """How a session's tokens are used: ``Bearer``, or ``DPoP (ES256, key thumbprint ...)``
    (RFC 9449; the thumbprint is the RFC 7638 one a token's ``cnf.jkt`` names)."""
    from compozy_client.safetext import one_line

    if session.token_type != "DPoP":
        return "Bearer" if session.kind == "oidc" else "-"
    thumbprint = one_line(session.dpop_thumbprint or "?", 64)
    if short and len(thumbprint) > 12:
        thumbprint = thumbprint[:12] + "…"
    return f"DPoP ({one_line(session.dpop_algorithm or '?', 16)}, key thumbprint {thumbprint})"


def when(epoch: float | None) -> str:
    """'in 54m (2026-11-22 12:34:56 UTC)' style."""
    import time

    if epoch is None:
        return "unknown"
    delta = epoch - time.time()
    absolute = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))
    span = _span(abs(delta))
    return f"in {span} ({absolute})" if delta >= 0 else f"{span} ago ({absolute})"


def _span(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"


def print_table(rows: list[list[str]]) -> None:
    """Rows of cells as left-aligned columns on stdout, the first row the heading."""
    for line in table_lines(rows):
        sys.stdout.write(line + "\n")


def table_lines(
    rows: list[list[str]], colors: list[list[str]] | None = None, stream: Any = None
) -> list[str]:
    """Rows of cells as left-aligned columns, one string per row.

    ``colors[r][c]``, an SGR code such as ``"32"`` (``""`` for none), colours cell
    ``c`` of row ``r`` when ``stream`` is a terminal and ``NO_COLOR`` is unset (see
    :func:`color`). Widths come from the plain text and the padding stays outside
    the escape codes, so coloured columns line up like plain ones.
    """
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for r, row in enumerate(rows):
        cells = []
        for c, (cell, width) in enumerate(zip(row, widths, strict=True)):
            code = colors[r][c] if colors is not None and stream is not None else ""
            padding = " " * (width - len(cell))
            cells.append((color(code, cell, stream) if code else cell) + padding)
        lines.append("  ".join(cells).rstrip())
    return lines


def span_from_now(epoch: float | None) -> str:
    """'in 54m00s' or '3m10s ago': :func:`when` without the date, for a column."""
    import time

    if epoch is None:
        return "-"
    delta = epoch - time.time()
    return f"in {_span(delta)}" if delta >= 0 else f"{_span(-delta)} ago"
