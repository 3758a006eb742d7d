"""User-facing errors: the CLI prints them as one line on stderr and exits non-zero."""


class UserError(Exception):
    """Bad input or configuration the user can fix (not a bug in the toolkit)."""


class MediaError(UserError):
    """Audio, image or video that cannot be read or written."""


class CheckpointError(UserError):
    """A checkpoint whose files, keys or shapes do not match the model."""
