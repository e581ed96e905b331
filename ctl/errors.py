"""Errors of the foundation that the services map to gRPC statuses, in a module that imports nothing, so
that a service's errors module (and with it its config, and `ctl`'s parser) loads no numpy."""


class TensorError(ValueError):
    """A Tensor message is malformed or does not have the expected shape."""
