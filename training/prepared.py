"""Reader of the dataset folder written by ``training/prepare_data.py`` (both training stages use it).

::

    from training.prepared import PreparedDataset

    data = PreparedDataset("prepared")
    for clip in data.clips(kinds=["talking", "dyadic-split"], splits=["train"]):
        frames = clip.frames([0, 10, 20])          # uint8 [3, S, S, 3] RGB
        landmarks = clip.landmarks[[0, 10, 20]]    # float32 [3, 478, 3], crop pixels
        for start, stop in clip.contiguous_runs(60):  # stage 2: unbroken 25 fps stretches
            first = clip.indices[start]                # timeline frame of the run's first crop
            audio = clip.audio()[first * 640 : (first + stop - start) * 640]
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

SAMPLE_RATE = 16000
HINT = "run training/prepare_data.py first (python training/prepare_data.py --help)"


class NotPreparedError(FileNotFoundError):
    """The folder is not (or not completely) a prepared dataset."""


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise NotPreparedError(f"Missing or unreadable image {path}: the dataset is incomplete; {HINT}.")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _load(path: Path, mmap: bool = True) -> np.ndarray:
    if not path.is_file():
        raise NotPreparedError(f"Missing {path}: the dataset is incomplete; {HINT}.")
    return np.load(path, mmap_mode="r" if mmap else None)


def _read_wav(path: Path) -> np.ndarray:
    import soundfile as sf

    audio, sr = sf.read(str(path), dtype="float32", always_2d=False)
    if sr != SAMPLE_RATE or audio.ndim != 1:
        raise ValueError(f"{path} is not 16 kHz mono ({sr} Hz, shape {audio.shape}); {HINT}.")
    return audio


@dataclass
class PreparedClip:
    """One face-cropped video clip: kept frames numbered 0..num_frames-1, each at timeline index
    `indices[i]` (25 fps; time = index / 25 s)."""

    root: Path
    id: str
    kind: str
    split: str
    identity: str
    num_frames: int
    has_audio: bool
    real: bool = True
    dropped: int = 0
    timeline_frames: int = 0
    fps: int = 25
    meta: dict = field(default_factory=dict, repr=False)

    @property
    def folder(self) -> Path:
        return self.root / "clips" / self.id

    def frame(self, i: int) -> np.ndarray:
        """Kept frame `i` as uint8 [S, S, 3] RGB."""
        if not -self.num_frames <= i < self.num_frames:
            raise IndexError(f"Frame {i} of clip {self.id}, which has {self.num_frames} frames.")
        return _read_rgb(self.folder / "frames" / f"{i % self.num_frames:05d}.jpg")

    def frames(self, idx: list[int] | np.ndarray | range) -> np.ndarray:
        """Kept frames as uint8 [len(idx), S, S, 3] RGB."""
        return np.stack([self.frame(int(i)) for i in idx])

    @functools.cached_property
    def landmarks(self) -> np.ndarray:
        """float32 [T, 478, 3] mesh in crop pixels (memory-mapped)."""
        return _load(self.folder / "landmarks.npy")

    @functools.cached_property
    def matrices(self) -> np.ndarray:
        """float32 [T, 2, 3] affine: source-frame pixels -> crop pixels."""
        return _load(self.folder / "matrices.npy")

    @functools.cached_property
    def indices(self) -> np.ndarray:
        """int64 [T] timeline (25 fps) index of each kept frame."""
        return _load(self.folder / "indices.npy", mmap=False)

    @functools.cached_property
    def vad(self) -> np.ndarray | None:
        """float32 [timeline_frames] voice activity (0/1) of the clip's own audio, or None."""
        return _load(self.folder / "vad.npy", mmap=False) if self.has_audio else None

    def audio(self) -> np.ndarray | None:
        """The clip's own audio, 16 kHz mono float32 (timeline_frames x 640 samples), or None."""
        return _read_wav(self.folder / "audio.wav") if self.has_audio else None

    def contiguous_runs(self, min_length: int = 1) -> list[tuple[int, int]]:
        """(start, stop) ranges of kept-frame positions whose timeline indices are consecutive (no
        dropped frame) within one shot, at least `min_length` frames long."""
        indices = self.indices
        breaks = set(np.flatnonzero(np.diff(indices) != 1) + 1) | set(self.meta.get("shot_starts", []))
        bounds = [0, *sorted(b for b in breaks if 0 < b < len(indices)), len(indices)]
        return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b - a >= max(1, min_length)]

    def __len__(self) -> int:
        return self.num_frames


@dataclass
class PreparedPortrait:
    root: Path
    id: str
    kind: str
    split: str
    identity: str
    real: bool = True

    def image(self) -> np.ndarray:
        """The face crop, uint8 [S, S, 3] RGB."""
        return _read_rgb(self.root / "portraits" / f"{self.id}.jpg")

    @functools.cached_property
    def landmarks(self) -> np.ndarray:
        """float32 [478, 3] in crop pixels."""
        return _load(self.root / "portraits" / f"{self.id}.npy", mmap=False)


@dataclass
class PreparedAudio:
    """An audio-only track (speech, dual-audio, turns)."""

    root: Path
    id: str
    kind: str
    split: str
    identity: str
    seconds: float
    rttm: str | None = None

    def audio(self) -> np.ndarray:
        """16 kHz mono float32."""
        return _read_wav(self.root / "audio" / f"{self.id}.wav")

    @functools.cached_property
    def vad(self) -> np.ndarray:
        """float32 [ceil(seconds * 25)] voice activity (0/1)."""
        return _load(self.root / "audio" / f"{self.id}.vad.npy", mmap=False)

    @property
    def rttm_path(self) -> Path | None:
        return self.root / self.rttm if self.rttm else None


class PreparedDataset:
    """A folder written by training/prepare_data.py (its dataset.json index)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        index_path = self.root / "dataset.json"
        if not index_path.is_file():
            raise NotPreparedError(f"{self.root} is not a prepared dataset (no dataset.json): {HINT}.")
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise NotPreparedError(f"{index_path} is not valid JSON ({exc}): {HINT}.") from exc
        if self.index.get("version") != 1:
            raise NotPreparedError(
                f"{index_path} has version {self.index.get('version')!r}; this reader knows version 1: {HINT}."
            )
        self.size: int = int(self.index["size"])
        self.fps: int = int(self.index.get("fps", 25))

    def clips(self, kinds: list[str] | str | None = None, splits: list[str] | str | None = None) -> list[PreparedClip]:
        kinds, splits = _as_set(kinds), _as_set(splits)
        out = []
        for entry in self.index.get("clips", []):
            if (kinds and entry["kind"] not in kinds) or (splits and entry["split"] not in splits):
                continue
            meta_path = self.root / "clips" / entry["id"] / "meta.json"
            if not meta_path.is_file():
                raise NotPreparedError(f"dataset.json lists clip {entry['id']} but {meta_path} is missing: {HINT}.")
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            out.append(
                PreparedClip(
                    root=self.root,
                    id=entry["id"],
                    kind=entry["kind"],
                    split=entry["split"],
                    identity=entry["identity"],
                    num_frames=int(entry["num_frames"]),
                    has_audio=bool(entry["has_audio"]),
                    real=bool(entry.get("real", True)),
                    dropped=int(entry.get("dropped", 0)),
                    timeline_frames=int(meta.get("timeline_frames", 0)),
                    fps=self.fps,
                    meta=meta,
                )
            )
        return out

    def clip(self, clip_id: str) -> PreparedClip:
        for clip in self.clips():
            if clip.id == clip_id:
                return clip
        raise KeyError(f"No clip {clip_id!r} in {self.root}.")

    def portraits(self, splits: list[str] | str | None = None) -> list[PreparedPortrait]:
        splits = _as_set(splits)
        return [
            PreparedPortrait(self.root, e["id"], e["kind"], e["split"], e["identity"], bool(e.get("real", True)))
            for e in self.index.get("portraits", [])
            if not splits or e["split"] in splits
        ]

    def audio_tracks(
        self, kinds: list[str] | str | None = None, splits: list[str] | str | None = None
    ) -> list[PreparedAudio]:
        kinds, splits = _as_set(kinds), _as_set(splits)
        return [
            PreparedAudio(self.root, e["id"], e["kind"], e["split"], e["identity"], float(e["seconds"]), e.get("rttm"))
            for e in self.index.get("audio", [])
            if (not kinds or e["kind"] in kinds) and (not splits or e["split"] in splits)
        ]

    def __repr__(self) -> str:
        return (
            f"PreparedDataset({str(self.root)!r}, size={self.size}, clips={len(self.index.get('clips', []))}, "
            f"portraits={len(self.index.get('portraits', []))}, audio={len(self.index.get('audio', []))})"
        )


def _as_set(values: list[str] | str | None) -> set[str] | None:
    if values is None:
        return None
    return {values} if isinstance(values, str) else set(values)
