"""Exception types of jaxlora.

Every error a user can cause (a bad file, a bad request, a full pool) is one of these, with a
message naming the file, the field and the expected value, so that callers (the server above all)
can turn it into a clear answer instead of a traceback from deep inside JAX.
"""

from __future__ import annotations


class JaxloraError(Exception):
    """Base class of every error jaxlora raises on purpose."""


class ConfigError(JaxloraError):
    """A configuration (config.json, adapter_config.json, a preset, a flag) is invalid."""


class FormatError(JaxloraError):
    """A checkpoint or adapter file is missing, unreadable, unsafe or does not match the model."""


class AdapterError(JaxloraError):
    """An adapter cannot be registered, found, loaded or used."""


class UnknownAdapterError(AdapterError):
    """No adapter is registered under the requested name."""


class PoolExhaustedError(JaxloraError):
    """A page pool (adapter or KV) has no room left for the request."""


class RequestError(JaxloraError):
    """A generation request is invalid (prompt too long, bad sampling parameter, ...)."""
