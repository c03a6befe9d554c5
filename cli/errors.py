"""The CLI's user-facing error, in a module light enough for every command to import."""


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""
