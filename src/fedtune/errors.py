"""User-facing errors.

Every mistake a user can make (bad config, missing data, unknown model, ...) raises
:class:`FedtuneError` with a message that says what is wrong and how to fix it. The CLI prints
the message and exits non-zero without a traceback; everything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FedtuneError(Exception):
    """An error caused by user input, reported without a traceback."""


class MessageError(FedtuneError):
    """Bytes that failed strict parsing (malformed, hostile, non-finite, wrong shapes, unknown codec).

    Raised by :mod:`fedtune.codecs` and :mod:`fedtune.messages`; a server that gets one from a reply
    logs the reason and goes on without that client.
    """


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> FedtuneError:
    """Error for a name missing from a registry, listing the valid names."""
    choices = sorted(choices)
    return FedtuneError(
        f"unknown {kind} '{name}'{did_you_mean(name, choices)}; valid: {', '.join(choices)}"
    )
