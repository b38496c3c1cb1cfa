"""The error types of checkpoint handling: a bad checkpoint (a value error) or no network to fetch one."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised or loaded into the model asked for."""


class HubUnreachableError(ConnectionError):
    """Published weights that are not cached and whose host (the Hub, the official release's) cannot be reached."""
