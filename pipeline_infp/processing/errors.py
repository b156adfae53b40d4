"""Exceptions for bad user input. Each message says what was wrong and what to do about it."""


class INFPInputError(ValueError):
    """Base class for every problem with a portrait, an audio track or a reference clip."""


class ImageLoadError(INFPInputError):
    """The portrait could not be read or has an unusable size or format."""


class NoFaceDetectedError(INFPInputError):
    """No face was found in the portrait or in a reference frame."""


class AudioLoadError(INFPInputError):
    """An audio track is missing, empty, unreadable or has no samples."""


class AudioTooLongError(INFPInputError):
    """An audio track is longer than the allowed maximum duration."""


class SilentAudioError(INFPInputError):
    """Both tracks are silent, so there is nothing to talk or listen to."""


class VideoLoadError(INFPInputError):
    """A reference video could not be read."""
