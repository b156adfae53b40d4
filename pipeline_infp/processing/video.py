"""Reading reference clips and writing results as H.264/AAC mp4."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .audio import SAMPLE_RATE, _ffmpeg_decode, load_audio
from .errors import VideoLoadError

logger = logging.getLogger(__name__)

FramesInput = Sequence[Image.Image] | Sequence[np.ndarray] | np.ndarray


def _frames_to_uint8(frames: FramesInput) -> np.ndarray:
    if len(frames) and isinstance(frames[0], Image.Image):
        frames = [np.asarray(f.convert("RGB")) for f in frames]
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or len(arr) == 0:
        raise ValueError(f"Expected frames shaped [T, H, W, 3] with T > 0, got {arr.shape}.")
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    return arr.astype(np.uint8, copy=False)


def write_video(
    path: str | Path, frames: FramesInput, fps: float, audio: np.ndarray | None = None, sample_rate: int = SAMPLE_RATE
) -> str:
    """Write an H.264 (yuv420p) mp4, with `audio` (mono or [N, C]) as AAC trimmed or zero-padded
    to the video's duration. Returns the path as a string."""
    from moviepy import VideoClip
    from moviepy.audio.AudioClip import AudioArrayClip

    arr = _frames_to_uint8(frames)
    # yuv420p subsamples chroma 2x2, so H.264 needs even sizes: repeat the last row/column.
    arr = np.pad(arr, ((0, 0), (0, arr.shape[1] % 2), (0, arr.shape[2] % 2), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    # Not ImageSequenceClip: it sums float frame durations, and moviepy writes
    # int(duration * fps) frames, so it often drops the last frame (e.g. 30 frames at 30 fps -> 29).
    # Exact indices plus a tiny duration margin write every frame once.
    clip = VideoClip(lambda t: arr[min(round(t * fps), len(arr) - 1)], duration=len(arr) / fps + 1e-6)
    if audio is not None:
        samples = np.asarray(audio, dtype=np.float32)
        # Always stereo: moviepy 2 quantises mono clips into 2-column chunks but tells ffmpeg
        # there is 1 channel, which doubles the audio's duration in the file.
        samples = samples.reshape(len(samples), -1)
        samples = np.repeat(samples, 2, axis=1) if samples.shape[1] == 1 else samples
        length = round(len(arr) / fps * sample_rate)
        samples = np.pad(samples[:length], ((0, max(0, length - len(samples))), (0, 0)))
        clip = clip.with_audio(AudioArrayClip(np.clip(samples, -1.0, 1.0), fps=sample_rate))
    # moviepy names its temporary audio file after the output in the working directory by
    # default; a private folder keeps concurrent writes (and read-only working dirs) safe.
    try:
        with tempfile.TemporaryDirectory(prefix="infp_video_") as tmp:
            clip.write_videofile(
                str(path),
                fps=fps,
                codec="libx264",
                audio_codec="aac",
                audio_fps=sample_rate,
                temp_audiofile=os.path.join(tmp, "audio.m4a"),
                pixel_format="yuv420p",
                ffmpeg_params=["-movflags", "+faststart"],
                logger=None,
            )
    finally:
        clip.close()
    return str(path)


class VideoStream:
    """A clip's frames as uint8 [H, W, 3] RGB, resampled to `fps` (nearest source frame by
    timestamp) and decoded one at a time, so long or high-resolution clips never sit in memory
    as one array. Every iteration decodes the file again from the start (two-pass processing).

    `source_fps`, `width`, `height` and `estimated_frames` (at `fps`, from the container's frame
    count; 0 when unknown) are read when the stream is created; a missing or unreadable file
    raises VideoLoadError there. A source frame shown at several output times (upsampling) is
    yielded as the same array each time: copy it before modifying it in place.
    """

    def __init__(self, path: str | Path, fps: float = 25.0, max_frames: int | None = None):
        self.path = Path(path)
        self.fps = float(fps)
        self.max_frames = max_frames
        if not self.path.is_file():
            raise VideoLoadError(f"Video file not found: {self.path}. Check the path.")
        cap = self._open()
        try:
            source_fps = cap.get(cv2.CAP_PROP_FPS)
            self.width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
            self.height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            count = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        finally:
            cap.release()
        if not np.isfinite(source_fps) or source_fps <= 0:
            logger.warning("%s reports no frame rate; assuming %.2f fps.", self.path, fps)
            source_fps = self.fps
        self.source_fps = float(source_fps)
        estimate = round(count * self.fps / self.source_fps) if np.isfinite(count) and count > 0 else 0
        self.estimated_frames = min(estimate, max_frames) if max_frames is not None else estimate

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise VideoLoadError(
                f"Could not open the video {self.path}: use an mp4/mov/avi/webm file with a video stream."
            )
        return cap

    def __iter__(self) -> Iterator[np.ndarray]:
        cap = self._open()
        count, j, k = 0, 0, 0  # j: source frame index, k: output frame index
        try:
            while self.max_frames is None or count < self.max_frames:
                if not cap.grab():
                    break
                # Output frame k shows time k / fps; the nearest source frame is round(k * src / fps).
                if round(k * self.source_fps / self.fps) == j:  # source frames not shown are never converted
                    ok, frame = cap.retrieve()
                    if not ok:
                        break
                    rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                    while round(k * self.source_fps / self.fps) == j and (
                        self.max_frames is None or count < self.max_frames
                    ):
                        yield rgb
                        count += 1
                        k += 1
                j += 1
        finally:
            cap.release()


def read_video(path: str | Path, fps: float = 25.0, max_frames: int | None = None) -> tuple[np.ndarray, float]:
    """Decode a clip as uint8 [T, H, W, 3] RGB resampled to `fps` (nearest source frame by
    timestamp). Returns the frames and the source frame rate. See VideoStream for long clips."""
    stream = VideoStream(path, fps, max_frames)
    frames = list(stream)
    if not frames:
        raise VideoLoadError(f"No frames could be decoded from {stream.path}: the file is empty or corrupt.")
    return np.stack(frames), stream.source_fps


_FIRST_PTS = re.compile(r"Parsed_(a?)showinfo_\d+ @ [^\]]*\] n:\s*0 pts:\s*-?\d+ pts_time:\s*(-?[0-9.eE+-]+)")


def audio_delay(path: str | Path) -> float:
    """Seconds from a clip's first video frame to its first audio sample, by the streams' own
    timestamps (negative: the audio starts first). Containers may start the two streams at
    different times (e.g. video at 0.08 s, audio at 0); frame 0 and audio sample 0 are only
    simultaneous once this is corrected. 0 when either stream is missing or has no timestamp."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-copyts", "-i", str(path),
           "-map", "0:v:0", "-map", "0:a:0", "-vf", "showinfo", "-af", "ashowinfo",
           "-frames:v", "1", "-frames:a", "1", "-f", "null", "-"]  # fmt: skip
    stderr = subprocess.run(cmd, capture_output=True, check=False).stderr.decode(errors="replace")
    starts = {audio == "a": float(seconds) for audio, seconds in reversed(_FIRST_PTS.findall(stderr))}
    return starts[True] - starts[False] if len(starts) == 2 else 0.0


def read_audio_track(path: str | Path) -> np.ndarray | None:
    """The clip's first audio stream as 16 kHz mono float32, or None when it has none. Sample 0
    is the time of the first video frame (see `audio_delay`), so frame k meets audio at k / fps."""
    path = Path(path)
    if not path.is_file():
        raise VideoLoadError(f"Video file not found: {path}. Check the path.")
    try:
        decoded = _ffmpeg_decode(path)
    except RuntimeError as exc:
        raise VideoLoadError(f"Could not decode the audio of {path} ({exc}): the file may be corrupt.") from exc
    if decoded is None:
        return None
    audio = load_audio(decoded, name=f"audio track of {path.name}")
    shift = round(audio_delay(path) * SAMPLE_RATE)
    return np.pad(audio, (shift, 0)) if shift > 0 else audio[-shift:]
