"""Exceptions. Each also inherits a builtin, so callers may catch either (as nevergrad does)."""


class LoraHubPlusError(Exception):
    """Base class of every error lorahub-plus raises on purpose."""


class TaskFormatError(ValueError, LoraHubPlusError):
    """A task or examples file is malformed; the message names the file, line and field."""


class IncompatibleAdapterError(ValueError, LoraHubPlusError):
    """An adapter does not fit the library's base model (module names or shapes differ)."""


class LibraryError(ValueError, LoraHubPlusError):
    """A library folder, card or index is missing, malformed or inconsistent."""


class MissingDefaultError(ImportError, LoraHubPlusError):
    """An embedded default (model package) is not installed."""


class OutputPathError(ValueError, LoraHubPlusError):
    """An output path would overwrite a user's files, or cannot be written."""
