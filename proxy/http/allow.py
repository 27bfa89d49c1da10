"""Allow lists (DESIGN.md, "Least privilege"): which paths an app, or a
merchant, may use, as an operator writes them.

`*` matches within one path segment; a trailing `/*` or `/**` matches any
rest (`/x/*` matches `/x/anything/more` but not `/x`); `/**` alone is
everything, the default; `[]` allows nothing. A list is matched against the
normalized path as sent (dot segments resolved, `//` collapsed) with no
further percent-decoding: a path that spells an allowed one with escapes is
not that path, and is denied.
"""
from __future__ import annotations

import re
from typing import Iterable

# The default: every path.
EVERYTHING = ("/**",)


class BadPattern(ValueError):
    """An allow-list entry that is not a path pattern: why, for the operator."""


def _regex(pattern: str) -> str:
    if not pattern.startswith("/"):
        raise BadPattern(f"{pattern!r} does not start with /")
    if any(c in pattern for c in "?#") or any(ord(c) < 0x21 or ord(c) == 0x7F for c in pattern):
        raise BadPattern(f"{pattern!r} is not a path (no query, fragment, space or control character)")
    rest = ""
    for tail in ("/**", "/*"):
        if pattern.endswith(tail):
            pattern, rest = pattern[: -len(tail)], "/.*"
            break
    if "**" in pattern:
        raise BadPattern(f"{pattern!r}: ** only at the end, as /**")
    return "".join("[^/]*" if part == "*" else re.escape(part) for part in re.split(r"(\*)", pattern)) + rest


class AllowList:
    """A compiled list; `allows(path)` is one regex match (none for the default)."""

    __slots__ = ("patterns", "everything", "_match")

    def __init__(self, patterns: Iterable[str] = EVERYTHING):
        self.patterns = tuple(patterns)
        self.everything = "/**" in self.patterns
        self._match = None if self.everything or not self.patterns else \
            re.compile("|".join(f"(?:{_regex(p)})" for p in self.patterns)).fullmatch
        for pattern in self.patterns:          # every entry checked, the default's too
            _regex(pattern)

    def allows(self, path: str) -> bool:
        if self.everything:
            return True
        return self._match is not None and self._match(path) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AllowList) and other.patterns == self.patterns

    def __hash__(self) -> int:
        return hash(self.patterns)

    def __repr__(self) -> str:
        return f"AllowList({list(self.patterns)!r})"
