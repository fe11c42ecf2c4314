"""Methods: one module per method, same interface (see ``base``)."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError

# name -> module path; imported lazily so that `unsupseg --help` stays fast.
_METHODS = {
    "kmeans": "unsupseg.methods.kmeans",
    "cause-mlp": "unsupseg.methods.cause",
    "cause-tr": "unsupseg.methods.cause",
    "stego": "unsupseg.methods.stego",
    "leopart": "unsupseg.methods.leopart",
}


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> ModuleType:
    if name not in _METHODS:
        import difflib

        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint} (available: {', '.join(method_names())})")
    return importlib.import_module(_METHODS[name])
