"""Error helpers: every message says what was given, what was expected and how to fix it."""

from __future__ import annotations

import difflib
from typing import Iterable


class EdgepatchError(ValueError):
    """Base class of edgepatch's input errors (a ``ValueError``, so generic handlers still catch it)."""


class UnknownNameError(EdgepatchError, KeyError):
    """An edge, source or destination name that the graph does not have."""

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0]) if self.args else ""


def suggest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """`` Did you mean 'a', 'b'?`` for the closest candidates, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def shape_str(shape: Iterable[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def positive_int(value: object, name: str) -> int:
    """``value`` when it is an int >= 1 (not a bool), else an error naming ``name`` and what was given."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EdgepatchError(f"{name} must be a positive int; got {value!r}.")
    return value


def short_repr(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters for an error message."""
    s = repr(value)
    return s if len(s) <= limit else s[: limit - 3] + "..."
