"""The project's exception for mistakes a user can make."""


class ScoreCamError(Exception):
    """A user-facing error: bad path, bad option, unknown model or layer, unreadable video.

    The message is one line; the command line prints it and exits with code 2.
    """
