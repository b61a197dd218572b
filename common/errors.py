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


class NotARegularFile(InputError):
    """A device, FIFO, socket or folder named as an input: refused before anything is read from it."""


class InputNotAllowed(InputError):
    """An input from a place this run may not read (an http(s) host that is not allowed)."""


class InputTooLarge(InputError):
    """An input over the run's byte limit: refused before it is read."""


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


class AccessDenied(AvatarError):
    """Storage refused an operation (permission denied, wrong credentials, a read-only file system): a retry
    cannot help until someone changes the permissions, so it fails at once, naming the URI and the operation."""


class UnsafeOutputPath(AvatarError):
    """An output folder that is a symbolic link: writing through it could land outside the output prefix."""


class ConfigurationError(AvatarError):
    """The run's settings or environment cannot work (unknown backend, a wrong fps, missing weights): nothing runs."""


class ResourceExhausted(AvatarError):
    """The device ran out of memory in every lower-memory mode of the ladder; the message names the modes tried."""


class TransientError(AvatarError):
    """Worth retrying: storage hiccups, timeouts, a lost worker."""

    permanent = False


class EncoderError(AvatarError):
    """ffmpeg refused or crashed while encoding frames we produced: a bug or a broken install, not bad input."""

    permanent = False


class StaleArtifact(TransientError):
    """A cached artifact is missing or fails its checksum; its record is dropped so the stage is computed again."""


def is_permanent(exc: BaseException) -> bool:
    """True when retrying ``exc`` cannot succeed."""
    if isinstance(exc, AvatarError):
        return exc.permanent
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return True
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):
        return False
    return True
