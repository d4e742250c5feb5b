"""The one error type a user can fix: a bad flag, file, store, shard, checkpoint or environment.

Every library function that refuses an input raises ``UserError`` (or a subclass naming the kind of input) with a
one-line message that names the input and says what is wrong with it. The commands (engine.cli.run_command) print
such an error as one line and exit 2; any other exception is a bug and keeps its traceback (exit 1).

``UserError`` is a ``ValueError``: callers that validate values can keep catching ``ValueError``.
"""
from __future__ import annotations


class UserError(ValueError):
    """An input the user can fix, described in one line."""


class ConfigError(UserError):
    """A flag or a combination of flags that cannot be run."""


class ShardError(UserError):
    """A webdataset shard that is missing, unreadable, damaged or not what it should be."""


class StoreError(UserError):
    """A store that is missing, damaged, edited, from another teacher, or does not match the training samples."""


class CheckpointError(UserError):
    """A file that is not the checkpoint it should be (missing, another kind of file, damaged, not finite)."""


class WriteError(UserError):
    """An output that cannot be written (full disk, read-only or missing folder); the previous file is intact."""


class BusyError(UserError):
    """A folder (the embedded dataset, a teacher store) that another process is still building after the wait."""


class NonFiniteLossError(UserError):
    """Training diverged: the loss, a gradient or the weights became NaN or Inf; nothing non-finite was saved."""
