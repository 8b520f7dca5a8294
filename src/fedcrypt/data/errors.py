"""The one exception type the data layer raises for dataset problems."""


class DatasetError(Exception):
    """A dataset is unknown, missing or corrupt.

    The message is a single human-readable line, so the CLI can print it without a traceback.
    """
