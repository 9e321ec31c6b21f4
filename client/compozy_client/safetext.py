"""Untrusted text made safe for one line of a log or a terminal.

Identity providers put their own text into error responses (``error``,
``error_description``, ``error_uri``), ID-token claims and device-flow
fields. Written raw, a newline in it forges a line of the agent's log and an
escape sequence (``ESC [2J``) rewrites the person's terminal; bidi overrides
(U+202E) make text read other than it is. :func:`one_line` is the one place
such text is made harmless: the agent runs it over provider text before it
logs it or sends it to a client, the CLI over every agent message it prints.

Command lines and profile names in the audit log are untrusted the same way
(a program chooses its own argv): :func:`for_terminal` escapes them for
``compozy auth log`` without a length cap and with backslashes doubled, so an
escape in the output always means an escaped character, never a literal one;
:func:`json_bytes` escapes, in encoded JSON, what JSON leaves raw (DEL, C1,
bidi and other format characters) as ``\\uXXXX``, which decodes to the same
strings.

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


def for_terminal(text: str) -> str:
    """``text`` with every character that is not printable escaped, and ``\\`` doubled.

    Uncapped (the caller lays out its columns); the same characters as :func:`one_line`.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        "\\\\" if char == "\\" else char if char.isprintable() else _escaped(char)
        for char in text)


def _json_escaped(char: str) -> str:
    code = ord(char)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON has no escape past U+FFFF: a surrogate pair (RFC 8259 section 7)
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_bytes(data: bytes) -> bytes:
    """Encoded JSON with every character that is not printable escaped as ``\\uXXXX``.

    JSON encoders escape C0 inside strings; outside them formatted JSON has
    only spaces and newlines, which are kept.
    """
    if data.isascii() and b"\x7f" not in data:
        return data  # the common case, checked without decoding
    text = data.decode("utf-8", errors="surrogateescape")
    return "".join(
        char if char.isprintable() or char in "\n\r\t" else _json_escaped(char)
        for char in text).encode("utf-8", errors="surrogateescape")
