"""Loading, checking and analysing the two speech tracks (own voice / partner voice)."""

from __future__ import annotations

import math
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from .errors import AudioLoadError, AudioTooLongError

SAMPLE_RATE = 16000
MIN_SECONDS = 0.04
MAX_CHANNELS = 8

AudioInput = str | Path | np.ndarray | tuple


def _ffmpeg_decode(path: Path) -> tuple[np.ndarray, int] | None:
    """Decode the first audio stream of any container with the ffmpeg binary bundled by
    imageio-ffmpeg (no system ffmpeg needed) to float32 [N, C] at its own rate. None when the
    file has no audio stream; RuntimeError with ffmpeg's message when decoding fails.

    Channels and rate are left alone (a WAV in a private temp folder carries them): ffmpeg's
    own downmix changes the level (stereo -> mono is +3 dB), and load_audio mixes and
    resamples every source the same way.
    """
    import imageio_ffmpeg
    import soundfile as sf

    with tempfile.TemporaryDirectory(prefix="infp_audio_") as tmp:
        out = Path(tmp) / "audio.wav"
        cmd = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-nostdin",
            "-hide_banner",
            "-v",
            "error",
            "-i",
            str(path),
            "-map",
            "0:a:0",
            "-vn",
            "-c:a",
            "pcm_f32le",
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, check=False)
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace").strip()
            if "matches no streams" in stderr:
                return None
            raise RuntimeError(stderr.splitlines()[-1] if stderr else f"ffmpeg exit code {proc.returncode}")
        data, sr = sf.read(str(out), dtype="float32", always_2d=True)
    return data, sr


def _read_file(path: Path, name: str) -> tuple[np.ndarray, int]:
    if not path.is_file():
        raise AudioLoadError(f"The {name} file {path} does not exist: check the path.")
    import soundfile as sf

    try:  # libsndfile: wav/flac/ogg/mp3, fast and exact
        return sf.read(str(path), dtype="float32", always_2d=True)
    except Exception:
        pass  # not a libsndfile format (m4a, aac, mp4, ...): let ffmpeg try
    try:
        decoded = _ffmpeg_decode(path)
    except Exception as exc:
        raise AudioLoadError(
            f"Could not read the {name} file {path}: it is corrupt or not an audio format "
            f"({exc}). Convert it to WAV, MP3 or FLAC and try again."
        ) from exc
    if decoded is None:
        raise AudioLoadError(f"The {name} file {path} contains no audio stream: pass a file with speech in it.")
    return decoded


def _split_tuple(audio: tuple, name: str) -> tuple[np.ndarray, int]:
    """(array, sr) or Gradio's (sr, array)."""
    if len(audio) != 2:
        raise AudioLoadError(f"The {name} tuple must be (samples, sample_rate) or (sample_rate, samples).")
    a, b = audio
    if np.ndim(a) == 0 and np.ndim(b) > 0:
        a, b = b, a
    if np.ndim(b) != 0:
        raise AudioLoadError(
            f"The {name} tuple must hold one array and one sample rate, got {type(a).__name__} and {type(b).__name__}."
        )
    return np.asarray(a), int(b)


def _to_float(data: np.ndarray, name: str) -> np.ndarray:
    if np.issubdtype(data.dtype, np.floating):
        return data.astype(np.float32, copy=False)
    if data.dtype == np.uint8:  # 8-bit PCM is unsigned, centred on 128
        return (data.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(data.dtype, np.signedinteger):
        return data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    raise AudioLoadError(f"The {name} samples have dtype {data.dtype}: pass int16/int32 PCM or float samples.")


def _to_mono(data: np.ndarray, name: str) -> np.ndarray:
    if data.ndim == 1:
        return data
    if data.ndim == 2:
        frames_first = data.shape[1] <= MAX_CHANNELS and data.shape[1] <= data.shape[0]
        if frames_first:  # (N, C), as soundfile and Gradio give
            return data.mean(axis=1)
        if data.shape[0] <= MAX_CHANNELS:  # (C, N), as librosa and torchaudio give
            return data.mean(axis=0)
    raise AudioLoadError(
        f"The {name} array has shape {data.shape}; expected (N,), (N, C) or (C, N) with at most "
        f"{MAX_CHANNELS} channels."
    )


def load_audio(audio: AudioInput, sample_rate: int | None = None, name: str = "audio") -> np.ndarray:
    """Load a track as float32 mono at 16 kHz from a file path, an (array, sr) / (sr, array)
    tuple, or an array (at `sample_rate`, default 16 kHz)."""
    if isinstance(audio, (str, Path)):
        data, sr = _read_file(Path(audio), name)
    elif isinstance(audio, tuple):
        data, sr = _split_tuple(audio, name)
    else:
        data, sr = np.asarray(audio), sample_rate or SAMPLE_RATE
    if sr <= 0:
        raise AudioLoadError(f"The {name} sample rate is {sr}: pass a positive sample rate in Hz.")
    if data.size == 0:
        raise AudioLoadError(f"The {name} has 0 samples: pass a recording with sound in it.")
    data = _to_mono(_to_float(data, name), name)
    if data.size < MIN_SECONDS * sr:
        raise AudioLoadError(
            f"The {name} has {data.size} samples ({data.size / sr * 1000:.0f} ms); at least "
            f"{MIN_SECONDS * 1000:.0f} ms are needed: pass a longer recording."
        )
    if not np.isfinite(data).all():
        raise AudioLoadError(f"The {name} contains NaN or infinite samples: re-export the recording.")
    if sr != SAMPLE_RATE:
        # soxr directly = librosa.resample(res_type="soxr_hq") without librosa's ~1 s lazy imports.
        import soxr

        data = soxr.resample(data, sr, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(data, dtype=np.float32)


def pad_to_same_length(*tracks: np.ndarray) -> list[np.ndarray]:
    """Zero-pad each track at the end to the length of the longest."""
    length = max(len(t) for t in tracks)
    return [np.pad(t, (0, length - len(t))) for t in tracks]


def check_duration(
    audio: np.ndarray, max_seconds: float, name: str = "audio", remedy: str = "trim it or raise max_duration."
) -> None:
    """Raise `AudioTooLongError` (its message ends with `remedy`) when `audio` lasts more than `max_seconds`."""
    seconds = len(audio) / SAMPLE_RATE
    if seconds > max_seconds:
        raise AudioTooLongError(f"The {name} track is {seconds:.1f} s long; the limit is {max_seconds:g} s: {remedy}")


def _db(rms: np.ndarray | float) -> np.ndarray:
    return 20.0 * np.log10(np.maximum(rms, 1e-10))


def is_silent(audio: np.ndarray, threshold_db: float = -60.0) -> bool:
    """True when the whole track's RMS level (dBFS) is below `threshold_db` or it is all zeros."""
    audio = np.asarray(audio, dtype=np.float64)
    if audio.size == 0 or not audio.any():
        return True
    return bool(_db(np.sqrt(np.mean(audio**2))) < threshold_db)


def voice_activity(
    audio: np.ndarray,
    num_frames: int,
    fps: float = 25.0,
    floor_db: float = -50.0,
    min_gap: float = 0.25,
    min_burst: float = 0.1,
    relative_threshold: float = 0.4,
) -> np.ndarray:
    """Energy-based speech/no-speech per video frame, float32 [num_frames] of 0/1.

    Threshold: `relative_threshold` (40%) of the way from the noise floor (10th percentile of frame levels) to the loud
    level (95th percentile), never below `floor_db`: adapts to noisy and quiet recordings and to
    separated dialogue tracks whose pauses hold the partner's faint crosstalk. Then gaps
    shorter than `min_gap` s (pauses between words) are filled and bursts shorter than
    `min_burst` s (clicks, breaths) dropped.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if num_frames <= 0 or is_silent(audio):
        return np.zeros(max(num_frames, 0), dtype=np.float32)
    # Frame i covers samples [i, i + 1) * hop; frames past the end of the audio are silent.
    bounds = np.minimum(np.round(np.arange(num_frames + 1) * SAMPLE_RATE / fps).astype(int), len(audio))
    energy = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])[bounds]
    level = _db(np.sqrt(np.diff(energy) / (SAMPLE_RATE / fps)))
    noise, loud = np.percentile(level, [10, 95])
    threshold = max(noise + relative_threshold * (loud - noise), floor_db)
    active = level > threshold
    active = _fill_runs(active, False, math.ceil(min_gap * fps))
    active = _fill_runs(active, True, math.ceil(min_burst * fps))
    return active.astype(np.float32)


def silence_weights(activity: np.ndarray, ramp: int = 4) -> np.ndarray:
    """Per frame, how far into a silence of the speaker it is, float32 [T] in [0, 1]: 0 on frames with voice
    activity (`voice_activity` > 0.5), then rising by 1 / (ramp + 1) per frame of distance from the nearest such
    frame, before and after, up to 1; all ones without any activity. Lips part a little before a word is heard
    and close after it, so a constraint on silent frames should ease in and out rather than switch."""
    active = np.asarray(activity, dtype=np.float64) > 0.5
    frames = np.arange(len(active))
    if not active.any():
        return np.ones(len(active), dtype=np.float32)
    last = np.maximum.accumulate(np.where(active, frames, -len(active) - ramp - 1))
    following = np.minimum.accumulate(np.where(active, frames, 2 * len(active) + ramp + 1)[::-1])[::-1]
    distance = np.minimum(frames - last, following - frames)
    return np.clip(distance / (ramp + 1), 0.0, 1.0).astype(np.float32)


def _fill_runs(mask: np.ndarray, value: bool, shorter_than: int) -> np.ndarray:
    """Flip interior runs of `value` shorter than `shorter_than` frames (gaps between speech are
    only filled when speech is on both sides; speech bursts anywhere are dropped)."""
    mask = mask.copy()
    edges = np.flatnonzero(np.diff(np.concatenate([[-1], mask.astype(np.int8), [-1]])) != 0)
    for start, end in zip(edges[:-1], edges[1:]):
        is_interior = start > 0 and end < len(mask)
        if mask[start] == value and end - start < shorter_than and (value or is_interior):
            mask[start:end] = not value
    return mask


def mix_tracks(own: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Sum both tracks (padded to the same length); scale down only if the sum would clip."""
    mixed = np.add(*pad_to_same_length(np.asarray(own, np.float32), np.asarray(other, np.float32)))
    peak = float(np.abs(mixed).max(initial=0.0))
    return mixed / peak if peak > 1.0 else mixed
