"""One line that says what went wrong, for logs and job events.

    first_line(RayActorError(...))   # 'The actor 80f3... is unavailable: ...'
    first_line(OSError())            # 'OSError' (an error with no message gets its type's name)

A Ray task error's text is the remote traceback, whose last line names the exception; any other error's
first non-blank line is taken.
"""

from __future__ import annotations


def first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    from ray.exceptions import RayActorError, RayError

    remote_traceback = isinstance(error, RayError) and not isinstance(error, RayActorError)
    return lines[-1] if remote_traceback else lines[0]
