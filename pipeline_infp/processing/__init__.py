"""Input/output processing for INFP: portraits and faces, speech tracks, video files."""

from .audio import (
    SAMPLE_RATE,
    check_duration,
    is_silent,
    load_audio,
    mix_tracks,
    pad_to_same_length,
    voice_activity,
)
from .errors import (
    AudioLoadError,
    AudioTooLongError,
    ImageLoadError,
    INFPInputError,
    NoFaceDetectedError,
    SilentAudioError,
    VideoLoadError,
)
from .face import (
    FaceCrop,
    FaceProcessor,
    FaceTrack,
    apply_matrix,
    crop_matrix,
    eye_aperture,
    hybrid_representation,
    load_image,
    mouth_aperture,
    paste_back,
)
from .mesh_warp import mesh_flow, mesh_triangles, mesh_warp, retarget_landmarks
from .video import read_audio_track, read_video, write_video

__all__ = [
    "SAMPLE_RATE",
    "AudioLoadError",
    "AudioTooLongError",
    "FaceCrop",
    "FaceProcessor",
    "FaceTrack",
    "INFPInputError",
    "ImageLoadError",
    "NoFaceDetectedError",
    "SilentAudioError",
    "VideoLoadError",
    "apply_matrix",
    "check_duration",
    "crop_matrix",
    "eye_aperture",
    "hybrid_representation",
    "is_silent",
    "load_audio",
    "load_image",
    "mesh_flow",
    "mesh_triangles",
    "mesh_warp",
    "mix_tracks",
    "mouth_aperture",
    "pad_to_same_length",
    "paste_back",
    "read_audio_track",
    "read_video",
    "retarget_landmarks",
    "voice_activity",
    "write_video",
]
