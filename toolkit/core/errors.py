"""The one exception type the CLI turns into a single clear line and a non-zero exit."""

import re

# A setting named in a message, as `batch_size`: a Python caller reads the parameter name, the
# command line reads the flag.
_SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")


class ToolkitError(Exception):
    """An error the user can fix: bad path, unknown name, corrupt file, missing GPU...

    `option` names the setting a message is about (a parameter name such as `batch_size`): the
    message starts with it as it is, and on the command line as its flag (`--batch-size`). Other
    settings a message mentions are written in backquotes, and are rendered the same way.
    """

    exit_code = 1

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option

    def __str__(self) -> str:
        return f"{self.option} {self.args[0]}" if self.option else str(self.args[0])

    def for_command_line(self) -> str:
        """The message as the CLI prints it: the setting named by its flag."""
        text = _SETTING.sub(lambda match: _flag(match[1]), str(self.args[0]))
        return f"{_flag(self.option)} {text}" if self.option else text


def _flag(setting: str) -> str:
    return "--" + setting.replace("_", "-")


class Interrupted(ToolkitError):
    """Ctrl-C during long work; the message says what was kept."""

    exit_code = 130
