"""Errors a user can cause. The CLI prints them as one line and exits 2."""


class ConveyorError(Exception):
    """A problem with the user's input (path, config, request), not a bug."""


class ModelLoadError(ConveyorError):
    """The model could not be found or read."""


class RequestError(ConveyorError):
    """A request cannot be served as given (too long, bad parameters)."""
