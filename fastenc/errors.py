"""The exceptions of fastenc's public contract (API.md, "Errors")."""


class FastencError(Exception):
    """Base class of every error fastenc raises on purpose."""


class LoadError(FastencError):
    """A checkpoint, its config or its tokenizer cannot be loaded as asked."""


class InputError(FastencError, ValueError):
    """Bad input to the encoder, found before any computation runs."""


class BackendError(FastencError, RuntimeError):
    """The requested compute backend cannot run here."""
