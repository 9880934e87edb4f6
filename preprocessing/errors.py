"""The one exception preprocessing raises for bad input: it names the file, folder or setting at fault."""


class DataError(ValueError):
    """A source, output folder or option that preprocessing cannot work with; the message says why."""
