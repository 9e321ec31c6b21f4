"""safetext: untrusted text becomes one printable line (one_line), a safe table cell
(for_terminal) or JSON without raw controls (json_bytes)."""

from __future__ import annotations

import json

import msgspec
import pytest

from compozy_client.safetext import ELLIPSIS, for_terminal, json_bytes, one_line


def test_plain_text_is_left_alone() -> None:
    text = "invalid_grant: the refresh token expired (éàü, 名前)"
    assert one_line(text) == text


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb", "a\\nb"),  # a newline would start a forged log line
        ("a\r\nb", "a\\r\\nb"),
        ("\x1b[2J", "\\x1b[2J"),  # clear screen: the ESC is what makes it a sequence
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),  # OSC window title, ended by BEL
        ("\x00\x7f", "\\x00\\x7f"),  # NUL, DEL
        ("\x85\x9b", "\\x85\\x9b"),  # C1: NEL and CSI
        ("abc\u202etxt.exe", "abc\\u202etxt.exe"),  # a bidi override
        ("a\u2028b\u2029c", "a\\u2028b\\u2029c"),  # line and paragraph separators
        ("zero\u200bwidth", "zero\\u200bwidth"),
        ("tab\there", "tab\\there"),
    ],
)
def test_every_control_character_is_shown_escaped(raw: str, shown: str) -> None:
    assert one_line(raw) == shown
    assert one_line(raw).isprintable()


def test_length_is_capped_after_escaping() -> None:
    assert one_line("x" * 1000, 50) == "x" * 47 + ELLIPSIS
    escaped = one_line("\x1b" * 100, 20)
    assert len(escaped) == 20 and escaped.endswith(ELLIPSIS) and "\x1b" not in escaped
    assert one_line("short", 5) == "short"


UNSAFE = ["\n", "\r", "\t", "\x00", "\x07", "\x1b", "\x7f", "\x85", "\x9b", "\u061c", "\u200b",
          "\u200e", "\u200f", "\u2028", "\u2029", "\u202a", "\u202e", "\u2066", "\u2069",
          "\ufeff"]


@pytest.mark.parametrize("char", UNSAFE, ids=[f"U+{ord(c):04X}" for c in UNSAFE])
def test_every_unsafe_character_is_escaped_for_a_terminal(char: str) -> None:
    printed = for_terminal(f"a{char}b")
    assert char not in printed
    assert printed.isprintable() and printed.startswith("a\\") and printed.endswith("b")


def test_escapes_are_readable_and_unambiguous() -> None:
    assert for_terminal("a\nb") == "a\\nb"
    assert for_terminal("\x1b[2J") == "\\x1b[2J"
    assert for_terminal("\u202eevil") == "\\u202eevil"
    # A literal backslash cannot pass for an escaped character.
    assert for_terminal("\\x1b") == "\\\\x1b" != for_terminal("\x1b")
    assert for_terminal("plain text, é, 名前, emoji 🙂") == "plain text, é, 名前, emoji 🙂"


def test_json_keeps_its_meaning_and_loses_its_raw_controls() -> None:
    value = {"argv": ["t\n\x1b[2J\x7f\x9b\u202eevil\u2028é\U000e0001"]}
    for encoded in (msgspec.json.encode(value), msgspec.json.format(msgspec.json.encode(value))):
        safe = json_bytes(encoded)
        assert json.loads(safe) == value
        text = safe.decode()
        for char in ("\x1b", "\x7f", "\x9b", "\u202e", "\u2028", "\U000e0001"):
            assert char not in text
        assert "é" in text  # printable text stays as it is
    assert json_bytes(b'{"a": "plain"}') == b'{"a": "plain"}'


INVISIBLE = ["\u034f", "\u115f", "\u1160", "\u17b4", "\u180b", "\u3164", "\ufe0f", "\uffa0",
             "\U000e0100"]


@pytest.mark.parametrize("char", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_characters_drawn_as_nothing_are_escaped_though_python_calls_them_printable(
    char: str,
) -> None:
    """A profile "dev\\u3164" (Hangul filler) or an argv ending in a variation selector
    printed as "dev": a caller's failures could pass for another's. Unicode's
    Default_Ignorable_Code_Point characters are escaped everywhere the log is printed."""
    assert char.isprintable()  # why str.isprintable alone let them through
    assert for_terminal(f"dev{char}") == f"dev{ascii(char)[1:-1]}"
    assert one_line(f"dev{char}") == f"dev{ascii(char)[1:-1]}"
    safe = json_bytes(msgspec.json.encode({"profile": f"dev{char}"}))
    assert char not in safe.decode() and json.loads(safe) == {"profile": f"dev{char}"}
