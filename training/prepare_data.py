#!/usr/bin/env python
"""Prepare INFP training data: face crops at 25 fps with mesh landmarks, 16 kHz audio and voice activity.

Both training stages (``train_head_imitation.py``, ``train_motion.py``) read the folder this script
writes, through ``training/prepared.py``. Every video is streamed twice (never held in memory as one
array): pass 1 finds the 478-point MediaPipe mesh on every frame resampled to 25 fps, pass 2 warps each
frame with a face to a ``size`` x ``size`` crop. The crop is the pipeline's own: an upright square
1.8 x the mesh bounding box, its centre and side smoothed by a centred moving average over 0.5 s
(the rule of ``FaceProcessor.track_video``), restarted at shot cuts. Frames without a face are dropped
and counted; their positions stay visible in ``indices.npy``.

Examples::

    python training/prepare_data.py --manifest ../shared/data/manifest.csv --out prepared --workers 2
    python training/prepare_data.py --videos /data/HDTF/clips --out prepared-hdtf --size 512 --workers 16
    python training/prepare_data.py --manifest m.csv --out /tmp/p --ids grid-bbaf2n --max-seconds 2
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import soundfile as sf
from tqdm.auto import tqdm

from pipeline_infp.processing import (
    SAMPLE_RATE,
    FaceProcessor,
    INFPInputError,
    NoFaceDetectedError,
    apply_matrix,
    audio_delay,
    load_audio,
    read_audio_track,
    voice_activity,
)
from pipeline_infp.processing.errors import VideoLoadError

# track_video's crop rule, shared rather than copied: square of the mesh bbox, moving average, warp.
from pipeline_infp.processing.face import face_square, moving_average, square_matrix, warp_to_crop
from pipeline_infp.processing.video import VideoStream

logger = logging.getLogger("prepare_data")

VERSION = 1
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640: frame i <-> samples [640 i, 640 (i + 1))
VIDEO_KINDS = ("talking", "dyadic-split", "nonverbal", "talking-generated", "conversation")
PORTRAIT_KINDS = ("portrait",)
AUDIO_KINDS = ("speech", "dual-audio", "turns")
DEFAULT_KINDS = VIDEO_KINDS + PORTRAIT_KINDS + AUDIO_KINDS
VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
DYADIC_LEFT = 512  # dyadic-split frames: the left 512 px are the real speaker
JPEG_QUALITY = 95
CLIP_INDEX_FIELDS = (
    "id",
    "kind",
    "split",
    "identity",
    "real",
    "num_frames",
    "timeline_frames",
    "dropped",
    "has_audio",
    "partner",
)
LOST_GAP = 12  # a face missing for more frames (0.5 s) restarts the crop track
CUT_JUMP = 0.25  # the crop square moving more than this x its side in one frame is a cut
CUT_RESIZE = 1.3  # ... or changing its side by more than this factor
CONVERSATION_PATIENCE = FPS  # conversation: keep waiting 1 s for the tracked face before re-picking

LAYOUT = """\
input:
  --manifest CSV   columns id, path, kind (required), split, identity, real, note, partner (optional);
                   path relative to the CSV's folder or absolute. The shared data's manifest.csv is one.
  --videos DIR     every video under DIR (mp4/mov/avi/mkv/webm/m4v) becomes a `talking` clip of split
                   `train`; id = path under DIR without extension ('/' -> '__'), identity = file stem for
                   files directly in DIR, else the first sub-folder (VoxCeleb2's id00017/<yt>/00001.mp4).
                   A manifest.csv inside DIR is used instead when present.

kinds:
  video clips      talking, dyadic-split (left 512 px only), nonverbal, talking-generated,
                   conversation (several people: the largest face is picked and followed)
  portraits        portrait
  audio only       speech, dual-audio (pairs share `identity`), turns (wav + .rttm labels)

output (--out):
  dataset.json                     index: {"version", "size", "fps", "clips", "portraits", "audio",
                                   "skipped"}, rebuilt from the folder at the end of every run
  clips/<id>/frames/00000.jpg ...  RGB face crops size x size (JPEG 95), one per kept frame
  clips/<id>/landmarks.npy         float32 [T, 478, 3] mesh in crop pixels
  clips/<id>/matrices.npy          float32 [T, 2, 3] frame pixels -> crop pixels
  clips/<id>/indices.npy           int64 [T] position of each kept frame on the clip's 25 fps timeline
                                   (gaps = frames without a face; audio time t = index / 25)
  clips/<id>/audio.wav             16 kHz mono PCM16, exactly timeline_frames x 640 samples (if any)
  clips/<id>/vad.npy               float32 [timeline_frames] voice activity 0/1 (if audio)
  clips/<id>/meta.json             id, kind, split, identity, real, source, source_fps, num_frames,
                                   timeline_frames, dropped, has_audio, audio_delay_s (how late the audio
                                   stream starts after the first frame; audio.wav is already aligned),
                                   size, fps, note, shot_starts
  portraits/<id>.jpg|.npy|.json    portrait crop, its landmarks [478, 3], its metadata
  audio/<id>.wav|.vad.npy|.json    16 kHz mono track, voice activity at 25 fps, metadata
  audio/<id>.rttm                  speaker turns (kind turns), copied as they are

Items already in --out are skipped (resumable; a killed run leaves only `.partial` folders, which are
redone), unless --overwrite. Clips without any face are recorded as skipped, never as errors.

large public datasets (HDTF, VoxCeleb2, ViCo, CANDOR-style dyadic recordings):
  Write a manifest with one row per video (kind `talking` for speakers with their own voice,
  `nonverbal` for listeners or silent footage; the optional `partner` column names the id of the
  other side of a dyadic conversation, whose audio is then the listener's partner track), or point
  --videos at a folder of clips. Run with --workers = CPU cores (each worker runs its own MediaPipe,
  ~10 ms per frame); split a huge corpus over machines with --shard K/N into the same --out (or into
  several folders), and re-run once at the end without --shard to rebuild dataset.json. Try a few
  items first with --ids ... --max-seconds 5 and look at the crops.
"""


# --------------------------------------------------------------------------- inputs


@dataclass
class Item:
    """One manifest row."""

    id: str
    path: str
    kind: str
    split: str = "train"
    identity: str = ""
    real: bool = True
    note: str = ""
    partner: str | None = None


def _is_real(value: str | None, kind: str) -> bool:
    """The manifest's `real` column ("real", "generated", "unknown", "left-real-right-generated",
    true/false...) for the part that is kept: dyadic-split clips keep only their real left half."""
    value = (value or "").strip().lower()
    if not value:
        return kind != "talking-generated"
    if kind == "dyadic-split" and value.startswith("left-real"):
        return True
    return value in ("1", "true", "yes", "real")


def read_manifest(path: str | Path) -> list[Item]:
    """Rows of a manifest CSV (the shared data's format); paths resolved against its folder."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"Manifest not found: {path}.")
    root = path.resolve().parent
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"id", "path", "kind"} - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{path} lacks the column(s) {', '.join(sorted(missing))}: see --help for the format.")
        items = []
        for row in reader:
            if not (row.get("id") or "").strip():
                continue
            if "/" in row["id"] or "\\" in row["id"] or row["id"].strip().startswith("."):
                raise SystemExit(f"{path}: id {row['id']!r} must be a plain name (no slashes, no leading dot).")
            file = Path(row["path"].strip())
            items.append(
                Item(
                    id=row["id"].strip(),
                    path=str(file if file.is_absolute() else root / file),
                    kind=row["kind"].strip(),
                    split=(row.get("split") or "train").strip(),
                    identity=(row.get("identity") or "").strip() or row["id"].strip(),
                    real=_is_real(row.get("real"), row["kind"].strip()),
                    note=(row.get("note") or "").strip(),
                    partner=(row.get("partner") or "").strip() or None,
                )
            )
    return items


def scan_videos(folder: str | Path) -> list[Item]:
    """A folder of videos as `talking` clips of split `train` (or the folder's own manifest.csv)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"--videos: {folder} is not a folder.")
    if (folder / "manifest.csv").is_file():
        return read_manifest(folder / "manifest.csv")
    items = []
    for file in sorted(folder.rglob("*")):
        if file.suffix.lower() not in VIDEO_EXTENSIONS or not file.is_file():
            continue
        rel = file.relative_to(folder)
        identity = file.stem if len(rel.parts) == 1 else rel.parts[0]
        items.append(
            Item(id=str(rel.with_suffix("")).replace(os.sep, "__"), path=str(file), kind="talking", identity=identity)
        )
    if not items:
        raise SystemExit(f"--videos: no video files ({', '.join(VIDEO_EXTENSIONS)}) under {folder}.")
    return items


# --------------------------------------------------------------------------- small helpers


def _write_json(path: Path, data: dict) -> None:
    """Atomic: a reader (or a resumed run) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_wav(path: Path, audio: np.ndarray) -> None:
    sf.write(str(path), np.clip(audio, -1.0, 1.0), SAMPLE_RATE, subtype="PCM_16")


def _write_jpeg(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {path}")


def _base_meta(item: Item, size: int) -> dict:
    return dict(
        id=item.id,
        kind=item.kind,
        split=item.split,
        identity=item.identity,
        real=item.real,
        source=item.path,
        size=size,
        fps=FPS,
        note=item.note,
    )


# --------------------------------------------------------------------------- face tracking


class FaceFollower:
    """Per-frame mesh of one face: the largest face first, then the face nearest the previous one.

    Following (rather than re-picking the largest face every frame) keeps the crop on one person in
    multi-person footage. With `patience` > 0 a frame where the followed face is not found is dropped
    rather than jumping to someone else, for up to `patience` frames; then the largest face is taken.
    """

    def __init__(self, processor: FaceProcessor, scale: float, patience: int = 0):
        self.processor = processor
        self.scale = scale
        self.patience = patience
        self.previous: np.ndarray | None = None  # (cx, cy, face size)
        self.lost = 0

    def __call__(self, frame: np.ndarray) -> np.ndarray | None:
        pts = self._find(frame)
        if pts is None:
            self.lost += 1
        else:
            self.lost = 0
            self.previous = np.array(face_square(pts, 1.0))
        return pts

    def _largest(self, frame: np.ndarray) -> np.ndarray | None:
        try:
            return self.processor.landmarks(frame)
        except NoFaceDetectedError:
            return None

    def _find(self, frame: np.ndarray) -> np.ndarray | None:
        if self.previous is None or self.lost > max(self.patience, LOST_GAP):
            return self._largest(frame)
        cx, cy, face = self.previous
        boxes = self.processor.detect(frame)
        distance = [math.hypot((b[0] + b[2]) / 2 - cx, (b[1] + b[3]) / 2 - cy) for b in boxes]
        for _, box in sorted((d, i) for i, d in enumerate(distance) if d < 0.5 * face):
            try:
                return self.processor.landmarks(frame, boxes[box])
            except NoFaceDetectedError:
                continue
        if self.patience and self.lost < self.patience:
            return None
        return self._largest(frame)  # a cut, a tight close-up the detector misses, or a new person


def shot_starts(indices: np.ndarray, squares: np.ndarray) -> list[int]:
    """Positions (among kept frames) where the crop track restarts: the face was lost for more
    than LOST_GAP frames, or the square jumped (a shot cut, or another face)."""
    starts = []
    for i in range(1, len(indices)):
        (x0, y0, s0), (x1, y1, s1) = squares[i - 1], squares[i]
        jump = math.hypot(x1 - x0, y1 - y0) > CUT_JUMP * max(s0, s1)
        resize = max(s0, s1) > CUT_RESIZE * min(s0, s1)
        if indices[i] - indices[i - 1] > LOST_GAP or jump or resize:
            starts.append(i)
    return starts


def smooth_matrices(squares: np.ndarray, starts: list[int], size: int, smoothing: float) -> np.ndarray:
    """track_video's rule per shot: centred moving average of the squares over `smoothing` s."""
    window = max(1, round(smoothing * FPS))
    bounds = [0, *starts, len(squares)]
    smoothed = np.concatenate([moving_average(squares[a:b], window) for a, b in zip(bounds[:-1], bounds[1:])])
    return np.stack([square_matrix(*square, size) for square in smoothed])


# --------------------------------------------------------------------------- per item work


@dataclass
class Options:
    out: str
    size: int
    scale: float
    smoothing: float
    max_seconds: float | None
    overwrite: bool
    bars: bool


def _bar(options: Options, **kwargs) -> tqdm:
    position = (mp.current_process()._identity or (1,))[0]
    return tqdm(disable=not options.bars, position=position, leave=False, dynamic_ncols=True, **kwargs)


def is_done(what: str, item: Item, options: Options) -> bool:
    """Whether `item` is already in the output (at this size): a resumed run skips it."""
    if options.overwrite:
        return False
    out = Path(options.out)
    if what == "rttm":
        return (out / "audio" / f"{item.id}.rttm").is_file()
    meta = _read_json(
        {"clip": out / "clips" / item.id / "meta.json", "portrait": out / "portraits" / f"{item.id}.json"}.get(
            what, out / "audio" / f"{item.id}.json"
        )
    )
    return meta is not None and (what == "audio" or meta.get("size") == options.size)


def prepare_clip(item: Item, options: Options, processor: FaceProcessor) -> dict:
    out = Path(options.out) / "clips"
    final = out / item.id
    tmp = out / f".{item.id}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "frames").mkdir(parents=True)

    max_frames = None if options.max_seconds is None else max(1, round(options.max_seconds * FPS))
    stream = VideoStream(item.path, FPS, max_frames)
    region = (lambda f: f[:, :DYADIC_LEFT]) if item.kind == "dyadic-split" else (lambda f: f)
    follower = FaceFollower(processor, options.scale, CONVERSATION_PATIENCE if item.kind == "conversation" else 0)

    # Pass 1: landmarks of every frame on the 25 fps timeline.
    kept, points, total = [], [], 0
    with _bar(options, total=stream.estimated_frames or None, desc=f"{item.id[:28]} mesh", unit="fr") as bar:
        for k, frame in enumerate(stream):
            total += 1
            pts = follower(region(frame))
            if pts is not None:
                kept.append(k)
                points.append(pts)
            bar.update()
    if total == 0:
        raise VideoLoadError(f"No frames could be decoded from {item.path}: the file is empty or corrupt.")

    meta = _base_meta(item, options.size)
    meta.update(
        source_fps=round(stream.source_fps, 3),
        source_size=[stream.width, stream.height],
        region=f"left {DYADIC_LEFT} px" if item.kind == "dyadic-split" else "full frame",
        timeline_frames=total,
        num_frames=len(kept),
        dropped=total - len(kept),
        scale=options.scale,
        smoothing=options.smoothing,
        max_seconds=options.max_seconds,
        partner=item.partner,
    )
    if item.kind == "conversation":
        meta["note"] = (meta["note"] + "; " if meta["note"] else "") + (
            "several people in the footage: the largest face at the start is followed"
        )

    if kept:
        indices = np.array(kept, dtype=np.int64)
        squares = np.array([face_square(p, options.scale) for p in points])
        starts = shot_starts(indices, squares)
        matrices = smooth_matrices(squares, starts, options.size, options.smoothing)
        # Pass 2: decode again and warp the kept frames.
        pos = 0
        with _bar(options, total=len(kept), desc=f"{item.id[:28]} crop", unit="fr") as bar:
            for k, frame in enumerate(stream):
                if pos == len(kept):
                    break
                if k == kept[pos]:
                    _write_jpeg(
                        tmp / "frames" / f"{pos:05d}.jpg", warp_to_crop(region(frame), matrices[pos], options.size)
                    )
                    pos += 1
                    bar.update()
        if pos != len(kept):
            raise VideoLoadError(f"The second decode of {item.path} ended after {pos} of {len(kept)} frames.")
        landmarks = np.stack([apply_matrix(p, m) for p, m in zip(points, matrices)]).astype(np.float32)
        np.save(tmp / "landmarks.npy", landmarks)
        np.save(tmp / "matrices.npy", matrices.astype(np.float32))
        np.save(tmp / "indices.npy", indices)
        meta["shot_starts"] = starts
    else:
        meta["skipped"] = f"no face found in any of the {total} frames"
        meta["shot_starts"] = []

    # Audio on the same timeline: exactly `total` frames x 640 samples.
    audio, audio_error = None, None
    try:
        audio = read_audio_track(item.path) if kept else None
    except INFPInputError as exc:
        audio_error = str(exc)
    meta["has_audio"] = audio is not None
    if audio_error:
        meta["audio_error"] = audio_error
    if audio is not None:
        meta["audio_seconds"] = round(len(audio) / SAMPLE_RATE, 3)
        meta["audio_delay_s"] = round(audio_delay(item.path), 4)
        length = total * SAMPLES_PER_FRAME
        audio = np.pad(audio[:length], (0, max(0, length - len(audio))))
        _write_wav(tmp / "audio.wav", audio)
        np.save(tmp / "vad.npy", voice_activity(audio, total, FPS).astype(np.float32))

    _write_json(tmp / "meta.json", meta)  # last: marks the clip as done
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return dict(status="skipped" if not kept else "done", **_summary(meta))


def _summary(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("id", "kind", "num_frames", "timeline_frames", "dropped", "skipped", "note")}


def prepare_portrait(item: Item, options: Options, processor: FaceProcessor) -> dict:
    out = Path(options.out) / "portraits"
    out.mkdir(parents=True, exist_ok=True)
    meta = _base_meta(item, options.size)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            crop = processor.crop_portrait(item.path, size=options.size, scale=options.scale)
    except NoFaceDetectedError as exc:
        meta["skipped"] = str(exc)
        logger.warning("Portrait %s skipped: %s", item.id, exc)
        _write_json(out / f"{item.id}.json", meta)
        return dict(status="skipped", id=item.id, kind=item.kind, skipped=str(exc))
    if caught:
        meta["warnings"] = [str(w.message) for w in caught]
    _write_jpeg(out / f"{item.id}.jpg", crop.image)
    np.save(out / f"{item.id}.npy", crop.landmarks.astype(np.float32))
    meta["matrix"] = crop.matrix.tolist()
    _write_json(out / f"{item.id}.json", meta)
    return dict(status="done", id=item.id, kind=item.kind)


def prepare_audio(item: Item, options: Options) -> dict:
    out = Path(options.out) / "audio"
    out.mkdir(parents=True, exist_ok=True)
    audio = load_audio(item.path, name=f"{item.kind} track {item.id}")
    if options.max_seconds is not None:
        audio = audio[: round(options.max_seconds * SAMPLE_RATE)]
    _write_wav(out / f"{item.id}.wav", audio)
    num_frames = math.ceil(len(audio) / SAMPLES_PER_FRAME)
    np.save(out / f"{item.id}.vad.npy", voice_activity(audio, num_frames, FPS).astype(np.float32))
    meta = _base_meta(item, options.size)
    del meta["size"]
    meta.update(seconds=round(len(audio) / SAMPLE_RATE, 3), num_frames=num_frames, max_seconds=options.max_seconds)
    _write_json(out / f"{item.id}.json", meta)
    return dict(status="done", id=item.id, kind=item.kind)


def copy_rttm(item: Item, options: Options) -> dict:
    out = Path(options.out) / "audio"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(item.path, out / f"{item.id}.rttm")
    return dict(status="done", id=item.id, kind=item.kind)


# --------------------------------------------------------------------------- workers

_processor: FaceProcessor | None = None


def _init_worker(log_level: int, pooled: bool = True) -> None:
    global _processor
    if pooled:
        os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ start-up chatter
        logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
        cv2.setNumThreads(1)  # one core per worker process
    _processor = FaceProcessor()


def run_task(task: tuple[str, Item, Options]) -> dict:
    """Process one item; any error becomes a `failed` result (the run goes on)."""
    what, item, options = task
    start = time.time()
    try:
        if is_done(what, item, options):
            result = dict(status="exists", id=item.id, kind=item.kind)
        elif what == "clip":
            result = prepare_clip(item, options, _processor)
        elif what == "portrait":
            result = prepare_portrait(item, options, _processor)
        elif what == "rttm":
            result = copy_rttm(item, options)
        else:
            result = prepare_audio(item, options)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop a long run
        shutil.rmtree(Path(options.out) / "clips" / f".{item.id}.partial", ignore_errors=True)
        result = dict(status="failed", id=item.id, kind=item.kind, error=f"{type(exc).__name__}: {exc}")
        logger.debug("%s failed:\n%s", item.id, traceback.format_exc())
    result["seconds"] = round(time.time() - start, 2)
    result["task"] = what
    return result


def make_tasks(items: list[Item], options: Options) -> list[tuple[str, Item, Options]]:
    tasks = []
    for item in items:
        if item.kind in VIDEO_KINDS:
            what = "clip"
        elif item.kind in PORTRAIT_KINDS:
            what = "portrait"
        elif item.kind in AUDIO_KINDS:
            what = "rttm" if item.path.lower().endswith(".rttm") else "audio"
        else:
            logger.warning("Unknown kind %r of %s: skipped (known: %s).", item.kind, item.id, ", ".join(DEFAULT_KINDS))
            continue
        tasks.append((what, item, options))

    def cost(task: tuple[str, Item, Options]) -> float:  # longest videos first: workers finish together
        try:
            return (1e6 if task[0] == "clip" else 0) + os.path.getsize(task[1].path)
        except OSError:
            return 0

    return sorted(tasks, key=cost, reverse=True)


# --------------------------------------------------------------------------- index


def build_index(out: Path, size: int) -> dict:
    """dataset.json from what is on disk, so partial and resumed runs stay consistent."""
    index: dict = dict(version=VERSION, size=size, fps=FPS, clips=[], portraits=[], audio=[], skipped=[])
    for meta_path in sorted((out / "clips").glob("*/meta.json")):
        if meta_path.parent.name.startswith("."):
            continue
        meta = _read_json(meta_path)
        if meta is None:
            continue
        if meta.get("size") != size:
            logger.warning(
                "clips/%s was prepared at size %s, not %s: left out of the index.",
                meta_path.parent.name,
                meta.get("size"),
                size,
            )
            continue
        if meta.get("skipped"):
            index["skipped"].append(dict(id=meta["id"], kind=meta["kind"], reason=meta["skipped"]))
            continue
        index["clips"].append({k: meta.get(k) for k in CLIP_INDEX_FIELDS})
    for meta_path in sorted((out / "portraits").glob("*.json")):
        meta = _read_json(meta_path)
        if meta is None or meta.get("size") != size:
            continue
        if meta.get("skipped"):
            index["skipped"].append(dict(id=meta["id"], kind=meta["kind"], reason=meta["skipped"]))
            continue
        index["portraits"].append({k: meta.get(k) for k in ("id", "kind", "split", "identity", "real")})
    for meta_path in sorted((out / "audio").glob("*.json")):
        meta = _read_json(meta_path)
        if meta is None:
            continue
        entry = {k: meta.get(k) for k in ("id", "kind", "split", "identity", "seconds")}
        rttm = meta_path.with_suffix(".rttm")
        entry["rttm"] = f"audio/{rttm.name}" if rttm.is_file() else None
        index["audio"].append(entry)
    _write_json(out / "dataset.json", index)
    return index


def kind_table(index: dict) -> str:
    rows: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for clip in index["clips"]:
        row = rows[clip["kind"]]
        row[0] += 1
        row[1] += clip["num_frames"]
        row[2] += clip["dropped"]
    for skipped in index["skipped"]:
        rows[skipped["kind"]][3] += 1
    lines = [f"{'kind':<20}{'clips':>7}{'kept':>9}{'dropped':>9}{'skipped':>9}"]
    for kind, (n, kept, dropped, skipped) in sorted(rows.items()):
        lines.append(f"{kind:<20}{n:>7}{kept:>9}{dropped:>9}{skipped:>9}")
    return "\n".join(lines)


def _report_line(result: dict) -> str | None:
    """One log line per prepared video clip and per skipped or failed item."""
    status = result["status"]
    if status == "exists" or (status == "done" and result["task"] != "clip"):
        return None
    if status == "done":
        detail = f"{result['num_frames']} kept, {result['dropped']} dropped"
    else:
        detail = result.get("error") or result.get("skipped")
    return f"{status:>7} {result['kind']:<17} {result['id']}: {detail} ({result['seconds']} s)"


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=LAYOUT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="manifest CSV (see below)")
    source.add_argument("--videos", type=Path, help="a folder of videos (see below)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (the prepared dataset)")
    parser.add_argument("--size", type=int, default=256, choices=(256, 512), help="crop side in pixels (default 256)")
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS), help="kinds to prepare (default: all)")
    parser.add_argument("--splits", nargs="+", default=None, help="only these splits (default: all)")
    parser.add_argument("--ids", nargs="+", default=None, help="only these ids (space or comma separated)")
    parser.add_argument("--max-seconds", type=float, default=None, help="cap every clip and track (quick runs)")
    parser.add_argument("--workers", type=int, default=2, help="processes, each with its own MediaPipe (default 2)")
    parser.add_argument("--shard", default=None, help="K/N: only every N-th item starting at K (0-based)")
    parser.add_argument("--overwrite", action="store_true", help="redo items already prepared (default: skip them)")
    parser.add_argument("--scale", type=float, default=1.8, help="crop side / mesh bounding box (default 1.8)")
    parser.add_argument("--smoothing", type=float, default=0.5, help="crop moving-average window in s (default 0.5)")
    parser.add_argument("--verbose", action="store_true", help="debug logging (tracebacks of failed items)")
    return parser.parse_args(argv)


def select(items: list[Item], args: argparse.Namespace) -> list[Item]:
    kinds = {k for value in args.kinds for k in value.split(",") if k}
    unknown = kinds - set(DEFAULT_KINDS)
    if unknown:
        raise SystemExit(f"--kinds: unknown kind(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULT_KINDS)}.")
    items = [item for item in items if item.kind in kinds]
    if args.splits:
        splits = {s for value in args.splits for s in value.split(",") if s}
        items = [item for item in items if item.split in splits]
    if args.ids:
        ids = {i for value in args.ids for i in value.split(",") if i}
        missing = ids - {item.id for item in items}
        if missing:
            logger.warning("--ids not found (or filtered out by --kinds/--splits): %s", ", ".join(sorted(missing)))
        items = [item for item in items if item.id in ids]
    if args.shard:
        try:
            k, n = (int(v) for v in args.shard.split("/"))
            assert 0 <= k < n
        except (ValueError, AssertionError):
            raise SystemExit(f"--shard {args.shard}: use K/N with 0 <= K < N, e.g. 0/4.") from None
        items = items[k::n]
    return items


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    start = time.time()
    items = read_manifest(args.manifest) if args.manifest else scan_videos(args.videos)
    duplicates = [k for k, n in Counter((i.id, i.kind, Path(i.path).suffix) for i in items).items() if n > 1]
    if duplicates:
        raise SystemExit(f"Duplicate ids in the input: {', '.join(d[0] for d in duplicates)}.")
    items = select(items, args)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    previous = _read_json(out / "dataset.json")
    if previous and previous.get("size") != args.size and not args.overwrite:
        raise SystemExit(
            f"{out} holds a dataset prepared at --size {previous.get('size')}: use another --out, or --overwrite."
        )
    options = Options(
        str(out), args.size, args.scale, args.smoothing, args.max_seconds, args.overwrite, bars=sys.stderr.isatty()
    )
    tasks = make_tasks(items, options)
    results = [dict(status="exists", id=t[1].id, kind=t[1].kind, task=t[0]) for t in tasks if is_done(*t)]
    tasks = [t for t in tasks if not is_done(*t)]
    logger.info(
        "%d items to prepare into %s with %d worker(s) (%d already done).", len(tasks), out, args.workers, len(results)
    )

    overall = tqdm(total=len(tasks), desc="items", unit="item", position=0, dynamic_ncols=True)
    log_level = logging.DEBUG if args.verbose else logging.WARNING
    if not tasks:
        pool, results_iter = None, iter(())
    elif args.workers <= 1 or len(tasks) <= 1:
        _init_worker(log_level, pooled=False)
        pool, results_iter = None, map(run_task, tasks)
    else:
        # spawn: every worker starts a clean interpreter and its own MediaPipe graphs.
        pool = mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=(log_level,))
        results_iter = pool.imap_unordered(run_task, tasks, chunksize=1)
    try:
        for result in results_iter:
            results.append(result)
            overall.update()
            line = _report_line(result)
            if line:
                overall.write(line)
    finally:
        overall.close()
        if pool is not None:
            pool.close()
            pool.join()
        if _processor is not None:
            _processor.close()

    index = build_index(out, args.size)
    status = Counter(r["status"] for r in results)
    failed = [r for r in results if r["status"] == "failed"]
    run_clips = [r for r in results if r["task"] == "clip" and r["status"] == "done"]
    heavy = [r for r in run_clips if r["timeline_frames"] and r["dropped"] > 0.2 * r["timeline_frames"]]
    print(kind_table(index))
    for r in heavy:
        print(f"many frames dropped: {r['id']} ({r['dropped']} of {r['timeline_frames']})")
    for r in failed:
        print(f"FAILED {r['kind']} {r['id']}: {r['error']}")
    kept = sum(c["num_frames"] for c in index["clips"])
    dropped = sum(c["dropped"] for c in index["clips"])
    print(
        f"{len(index['clips'])} clips, {kept} frames kept, {dropped} frames dropped, "
        f"{len(index['portraits'])} portraits, "
        f"{len(index['audio'])} audio tracks, {len(index['skipped'])} skipped in {out} | this run: "
        f"{status['done']} prepared, {status['exists']} already done, {status['skipped']} skipped, "
        f"{status['failed']} failed, {time.time() - start:.1f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
