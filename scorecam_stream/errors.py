"""The project's exceptions: mistakes a user can make, and a termination request."""


class ScoreCamError(Exception):
    """A user-facing error: bad path, bad option, unknown model or layer, unreadable video.

    The message is one line; the command line prints it and exits with code 2.
    """


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``ray job stop``): stop like Ctrl-C, with every clean-up."""
