"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class ToolkitError(Exception):
    """An error the user can fix: bad path, unknown name, corrupt file, missing GPU..."""

    exit_code = 1


class Interrupted(ToolkitError):
    """Ctrl-C during long work; the message says what was kept."""

    exit_code = 130
