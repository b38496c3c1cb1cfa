"""The one error type of checkpoint handling."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, recognised or loaded into the model asked for."""
