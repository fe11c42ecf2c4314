"""Exceptions of unsupseg.

Every error a user can cause is one of these, with a message that names the bad value or file and
says what to do. The CLI prints the message without a traceback and exits non-zero.
"""

from __future__ import annotations


class UnsupsegError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(UnsupsegError, ValueError):
    """A configuration value, preset or command-line option is invalid."""


class DataError(UnsupsegError):
    """An image, label file or dataset layout is missing or malformed."""


class WeightsError(UnsupsegError):
    """Backbone or model weights cannot be found, downloaded or loaded."""


class RunDirError(UnsupsegError):
    """A run directory is missing, incomplete, from an incompatible version, or tampered with."""


class CheckpointError(UnsupsegError):
    """A published checkpoint file is malformed or carries content we refuse to load."""


class OutputError(UnsupsegError):
    """An output file or folder cannot be written there (a file where a folder is needed, read-only,
    on top of an input, or holding somebody else's files)."""


class Interrupted(UnsupsegError):
    """Ctrl-C (SIGINT) stopped the work; the message says where a rerun resumes. Exit code 130."""
