"""What counts as the user's mistake, and one way to say it.

Every error the user can act on (a wrong path, value, model, job id, database or broker URL;
an image that cannot be read; a gate that refused a file) derives from `BonexrayError`.
The command line prints such an error as one line and exits with status 2. Anything else
(a plain ValueError, a KeyError, an AssertionError) is a bug: it keeps its traceback and
exit status 1, so that a bug is never mistaken for a user's mistake.

Most classes keep a standard base as well (ValueError, LookupError, OSError, ...), so code
that catches those still catches them; the two "not found" errors are LookupErrors.
"""

from __future__ import annotations


class BonexrayError(Exception):
    """An error whose message is for the user (the CLI: one line, exit status 2)."""


class InvalidValueError(BonexrayError, ValueError):
    """A value given by the user (an option, an argument, a setting) that cannot be used."""


class NotFoundError(BonexrayError, LookupError):
    """Something the user named (a job, a model) does not exist."""


class JobNotFoundError(NotFoundError):
    """No job has the id asked for."""


def one_line(exc: BaseException, *, typed: bool = False, limit: int | None = None) -> str:
    """An exception's message as one line (all whitespace folded; its type's name when it
    has no message), optionally prefixed with the type and cut to `limit` characters.

    The one place that formats errors for people: the CLI's messages, a failed view's
    stored reason and the worker logs use it."""
    text = " ".join(str(exc).split())
    if typed and text:
        text = f"{type(exc).__name__}: {text}"
    text = text or type(exc).__name__
    return text if limit is None else text[:limit]
