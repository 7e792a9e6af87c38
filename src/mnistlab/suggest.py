"""'Did you mean ...?' for a mistyped name: part of an error message, as git and cargo do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """' (did you mean 'tuned'?)' for the known name closest to `word`, or '' when none is
    close: to append to the error that names the mistake."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
