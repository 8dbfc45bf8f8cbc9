"""User-facing errors.

Anything a user can cause (recipe, data, model path, reward code) raises `UserError` with one line
that says what is wrong, where, and how to fix it. The CLI prints that line and exits with code 2,
without a traceback unless `--debug` is given.
"""


class UserError(Exception):
    """A problem in the user's input: printed as one line by the CLI, exit code 2."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (for one-line errors), at most `limit` chars."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


class Interrupted(Exception):
    """Training stopped by SIGTERM/SIGINT after saving a checkpoint; the CLI exits with `code`."""

    def __init__(self, message: str, code: int = 143):
        super().__init__(message)
        self.code = code


class ForcedStop(BaseException):
    """A second SIGTERM/SIGINT: stop at once, without waiting for the step or saving (the CLI exits with `code`).

    A BaseException, like KeyboardInterrupt, so that a reward's `except Exception` cannot swallow it.
    """

    def __init__(self, message: str, code: int = 143):
        super().__init__(message)
        self.code = code
