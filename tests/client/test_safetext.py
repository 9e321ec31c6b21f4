"""safetext.one_line: untrusted text becomes one printable line, capped."""

from __future__ import annotations

import pytest

from compozy_client.safetext import ELLIPSIS, one_line


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
