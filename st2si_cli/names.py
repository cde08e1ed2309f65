"""What a name in the zoo may be, and how text from users is shown on a terminal.

A name (a domain, a head, a backbone) is looked up by `Zoo.find`, shown in tables and messages,
written back on command lines (`--domain NAME`, `zoo info NAME`) and joined into other names (a
head's default name is `DOMAIN/BACKBONE`). So a name is 1 to `MAX_NAME_LENGTH` printable
characters: no control or format characters (escape sequences, newlines, tabs, bidirectional
overrides), no whitespace but plain spaces, and none at either end; it does not start with `-` (it
would read as an option) and is not six or more hex digits (it would hide an ID prefix).
"""

from __future__ import annotations

MAX_NAME_LENGTH = 128
_HEX = frozenset("0123456789abcdefABCDEF")


def escape_controls(text: str) -> str:
    """`text` with every character that is not printable (controls, escape sequences, line breaks,
    bidirectional overrides, lone surrogates) written as a visible escape such as `\\x1b` or `\\u202e`;
    plain spaces and everything printable stay as they are."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    if c in _SHORT:
        return _SHORT[c]
    o = ord(c)
    if o < 0x100:
        return f"\\x{o:02x}"
    return f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def name_problem(name: str) -> str | None:
    """Why `name` cannot name something in the zoo, or None if it can."""
    if not name:
        return "a name cannot be empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"a name is at most {MAX_NAME_LENGTH} characters, this one has {len(name)}"
    if not name.isprintable():
        bad = next(c for c in name if not c.isprintable())
        return f"a name cannot hold {_escape(bad)} (control, format or line-break characters)"
    if name != name.strip():
        return "a name cannot start or end with a space"
    if name.startswith("-"):
        return "a name cannot start with '-'"
    if len(name) >= 6 and set(name) <= _HEX:
        return "a name of six or more hex digits would read as an artifact ID prefix"
    return None


def check_name(name: str) -> str:
    """`name` if it can name something in the zoo; ValueError (saying why) if not."""
    problem = name_problem(name)
    if problem is not None:
        shown = escape_controls(name)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise ValueError(f"'{shown}': {problem}")
    return name
