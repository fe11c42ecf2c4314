"""The method registry: ``register_method`` records a ``Method`` subclass under its name (as timm's
``register_model`` does for models); ``get_method`` returns its instance.

Method modules are imported on first use, so that ``unsupseg --help`` stays fast: ``MODULES`` names
the module whose import registers each method.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import Method

MODULES = {
    "kmeans": "unsupseg.methods.kmeans",
    "cause-mlp": "unsupseg.methods.cause.method",
    "cause-tr": "unsupseg.methods.cause.method",
    "stego": "unsupseg.methods.stego",
    "leopart": "unsupseg.methods.leopart.method",
}

_REGISTRY: dict[str, Method] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register one instance of ``cls`` under ``cls.name`` (once)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def method_names() -> list[str]:
    return sorted(MODULES)


def get_method(name: str) -> Method:
    if name not in MODULES:
        import difflib

        close = difflib.get_close_matches(name, MODULES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint} (available: {', '.join(method_names())})")
    if name not in _REGISTRY:
        importlib.import_module(MODULES[name])
    return _REGISTRY[name]
