"""The exception types of jaxinfer: one per domain, each message saying what to do."""


class JaxinferError(Exception):
    """Base class of every error jaxinfer raises on purpose."""


class CheckpointError(JaxinferError):
    """A model checkpoint (HF directory or GGUF file) is missing, malformed or unsupported."""


class EngineError(JaxinferError):
    """A built engine directory is missing, corrupted, or was built for another jax version or device."""


class RequestError(JaxinferError, ValueError):
    """A generation request is invalid (bad sampling parameters, prompt too long, ...)."""
