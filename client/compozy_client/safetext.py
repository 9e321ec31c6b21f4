"""Untrusted text made safe for one line of a log or a terminal.

Identity providers put their own text into error responses (``error``,
``error_description``, ``error_uri``), ID-token claims and device-flow
fields. Written raw, a newline in it forges a line of the agent's log and an
escape sequence (``ESC [2J``) rewrites the person's terminal; bidi overrides
(U+202E) make text read other than it is. :func:`one_line` is the one place
such text is made harmless: the agent runs it over provider text before it
logs it or sends it to a client, the CLI over every agent message it prints.

Standard library only, and cheap when there is nothing to do: the CLI imports
it only when it prints a message.
"""

from __future__ import annotations

#: The longest provider text kept in a message, unless the caller says otherwise.
DEFAULT_LIMIT = 300
ELLIPSIS = "..."


def _escaped(char: str) -> str:
    # "\n" -> "\\n", ESC -> "\\x1b", U+202E -> "\\u202e": visible, one line, no effect.
    return ascii(char)[1:-1]


def one_line(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """``text`` with every character that is not printable shown as an escape, at most
    ``limit`` characters long (longer text ends in ``...``).

    Not printable (``str.isprintable``): C0 and C1 controls and DEL (so every
    escape sequence loses its ESC), line and paragraph separators (newlines
    included), format characters such as bidi overrides and zero-width joiners,
    surrogates and unassigned code points. The plain space stays.
    """
    if not text.isprintable():
        text = "".join(char if char.isprintable() else _escaped(char) for char in text)
    if len(text) > limit:
        text = text[: max(limit - len(ELLIPSIS), 0)] + ELLIPSIS
    return text
