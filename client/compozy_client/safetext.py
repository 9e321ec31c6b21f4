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


#: Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt): drawn as nothing.
#: Most are format characters, which ``str.isprintable`` already rejects; the rest
#: (U+034F, the Hangul fillers U+115F, U+1160, U+3164, U+FFA0, the variation
#: selectors...) count as printable, so "dev\u3164" would show as "dev".
_IGNORABLE_RANGES = (
    (0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
    (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
    (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)


def _ignorable(char: str) -> bool:
    code = ord(char)
    return code >= 0xAD and any(first <= code <= last for first, last in _IGNORABLE_RANGES)


def _shown(char: str) -> bool:
    """Whether ``char`` may be printed as it is: printable, and not drawn as nothing."""
    return char.isprintable() and not _ignorable(char)


def _all_shown(text: str) -> bool:
    return text.isprintable() and (text.isascii() or not any(map(_ignorable, text)))


def _escaped(char: str) -> str:
    # "\n" -> "\\n", ESC -> "\\x1b", U+202E -> "\\u202e": visible, one line, no effect.
    return ascii(char)[1:-1]


def one_line(text: str, limit: int = DEFAULT_LIMIT) -> str:
    """``text`` with every character that is not printable shown as an escape, at most
    ``limit`` characters long (longer text ends in ``...``).

    Not printable (``str.isprintable``): C0 and C1 controls and DEL (so every
    escape sequence loses its ESC), line and paragraph separators (newlines
    included), format characters such as bidi overrides and zero-width joiners,
    surrogates and unassigned code points; and the characters Unicode draws as nothing
    (Default_Ignorable_Code_Point: Hangul fillers, variation selectors). The plain
    space stays.
    """
    if not _all_shown(text):
        text = "".join(char if _shown(char) else _escaped(char) for char in text)
    if len(text) > limit:
        text = text[: max(limit - len(ELLIPSIS), 0)] + ELLIPSIS
    return text


def for_terminal(text: str) -> str:
    """``text`` with every character that is not printable escaped, and ``\\`` doubled.

    Uncapped (the caller lays out its columns); the same characters as :func:`one_line`.
    """
    if _all_shown(text) and "\\" not in text:
        return text
    return "".join(
        "\\\\" if char == "\\" else char if _shown(char) else _escaped(char)
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
        char if _shown(char) or char in "\n\r\t" else _json_escaped(char)
        for char in text).encode("utf-8", errors="surrogateescape")
