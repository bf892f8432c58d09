"""The one base of every user-facing error.

A HarnessError's message is the whole story for the user: the file, key or argument, the bad
value and the fix, on one line. Command lines catch HarnessError alone, print the message
and exit with `exit_code`; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations


class HarnessError(Exception):
    """An error whose message is meant for the user, never shown as a traceback."""

    exit_code = 2  # bad input; VerifyError uses 1 (the input was fine, the result is not)
    headline = "error"  # what a command line prints before the message


def first_line(error: BaseException) -> str:
    """The first line of an error's message (a library's multi-line message), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
