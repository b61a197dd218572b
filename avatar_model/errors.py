"""Error classes shared by every layer.

A *permanent* error is a property of the input: retrying cannot help, so the item fails at once with a
message a person can act on. A *transient* error is a property of the environment (storage, network,
timeouts) and is retried with backoff by the orchestration layer.
"""


class AvatarError(Exception):
    """Base class; ``permanent`` tells the orchestrator whether a retry can help."""

    permanent = True


class InputError(AvatarError):
    """The item's input is unusable as given."""


class InvalidItemId(InputError):
    pass


class DuplicateItemId(InputError):
    pass


class ObjectNotFound(InputError):
    pass


class UndecodableImage(InputError):
    pass


class UndecodableAudio(InputError):
    pass


class EmptyAudio(InputError):
    pass


class SilentAudio(InputError):
    pass


class FaceNotFound(InputError):
    pass


class InvalidParameter(InputError):
    pass


class TransientError(AvatarError):
    """Worth retrying: storage hiccups, timeouts, a lost worker."""

    permanent = False


class EncoderError(AvatarError):
    """ffmpeg refused or crashed while encoding frames we produced: a bug or a broken install, not bad input."""

    permanent = False


def is_permanent(exc: BaseException) -> bool:
    """True when retrying ``exc`` cannot succeed."""
    if isinstance(exc, AvatarError):
        return exc.permanent
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return True
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return False
    return True
