"""The one base class of clinfuse's user-facing errors.

Every error that a user can fix (a bad config value, an unreadable file, a model reference that
names nothing, an identifier about to be logged) is a :class:`ClinfuseError`; its message names the
file or value and says what to do. The CLI prints these in one line and exits 2; any other exception
is a bug and shows its traceback.

``ClinfuseError`` subclasses ``ValueError`` so that code written against the older, ValueError-based
errors keeps working.
"""

from __future__ import annotations

__all__ = ["ClinfuseError", "ModelLoadError", "StudyInputError"]


class ClinfuseError(ValueError):
    """An error in what the user gave (input, config, reference); the message says the fix."""


class ModelLoadError(ClinfuseError):
    """A model reference that does not name a loadable clinfuse model."""


class StudyInputError(ClinfuseError):
    """A study that cannot be predicted (no decodable pixels, non-finite values, too long a report, ...)."""
