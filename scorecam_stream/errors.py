"""The project's exceptions: mistakes a user can make, and a termination request."""


def first_line(err: BaseException) -> str:
    """Return the first non-blank line of an exception's message (its type name if none)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


class ScoreCamError(Exception):
    """A user-facing error: bad path, bad option, unknown model or layer, unreadable video.

    The message is one line; the command line prints it and exits with code 2.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``ray job stop``): stop like Ctrl-C, with every clean-up."""
