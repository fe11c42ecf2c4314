"""Methods: one ``Method`` subclass each, registered by name (see ``base`` and ``registry``)."""

from __future__ import annotations

from .registry import get_method, method_names, register_method

__all__ = ["get_method", "method_names", "register_method"]
