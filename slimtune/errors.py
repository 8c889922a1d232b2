"""SlimtuneError: the base of every error a user's input, config or files can cause.

`slimtune` (cli.main) catches it and prints one line, `slimtune <cmd>: error: <message>`, exit 2; anything
else is a bug and keeps its traceback. Each module defines its own subclass beside the code that raises it
(ConfigError, DataError, MethodError, ...); the classes here bridge to a built-in type for the raises that
were built-in before, so `except FileNotFoundError` in a caller's code still catches them. No slimtune
imports here: every module can import this one.
"""
from __future__ import annotations


class SlimtuneError(Exception):
    """A problem the user can fix; the message names the file, record or field and what to do."""


class MissingFileError(SlimtuneError, FileNotFoundError):
    """A file, folder or packaged asset the command needs is not there."""


class ExistingFileError(SlimtuneError, FileExistsError):
    """An output path already holds something slimtune will not replace unasked."""


class MissingPackageError(SlimtuneError, ImportError):
    """A setting asks for an optional package that is not installed."""


class UnsupportedError(SlimtuneError, NotImplementedError):
    """This model or machine cannot do what a setting asks; the message names the setting to change."""


class MismatchError(SlimtuneError, ValueError):
    """Saved weights that do not fit the model they are loaded into (another base model or method)."""


class DamagedFileError(SlimtuneError, ValueError):
    """A saved file that cannot be read back: cut short while written, or damaged since."""
