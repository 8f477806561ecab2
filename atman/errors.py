"""Exception types. Every error a user can cause is an :class:`AtmanError` (a ``ValueError``)."""

from __future__ import annotations


class AtmanError(ValueError):
    """Base class of all errors caused by the input given to atman."""


class EmptyInputError(AtmanError):
    """The prompt or the target is empty."""


class ContextLengthError(AtmanError):
    """Prompt and target together are longer than the model's context window."""


class NoUnitsError(AtmanError):
    """The chosen granularity yields no unit to explain."""


class GranularityError(AtmanError):
    """An unknown granularity, or options that do not fit it."""


class ModelLoadError(AtmanError):
    """A model id, directory or file that cannot be loaded."""


class UnsupportedModelError(AtmanError):
    """An architecture whose attention does not go through transformers' AttentionInterface."""


# an optional package is absent: what to install
MISSING = "{package} is not installed; install it with: {command}"


def missing(package: str, command: str) -> ImportError:
    """The ImportError raised when an optional package is absent, naming the command that installs it.

    Example::

        >>> str(missing("pandas", 'pip install "atman[pandas]"'))
        'pandas is not installed; install it with: pip install "atman[pandas]"'
    """
    return ImportError(MISSING.format(package=package, command=command))
