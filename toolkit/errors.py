"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class ToolkitError(Exception):
    """An error the user can fix: bad path, unknown name, corrupt file, missing GPU..."""
