"""Errors that mean "the user asked for something wrong": shown as one line, exit status 2."""

from __future__ import annotations

# ValueError covers bad flag combinations (raised up front by stages), RecordError (FILE:LINE:
# reason) and CheckpointError; FileNotFoundError covers missing inputs.
UserError = (ValueError, FileNotFoundError, FileExistsError)


def friendly(err: BaseException) -> str:
    return str(err) if str(err) else type(err).__name__
