"""Evaluation of the face renderer against simple baselines.

    python -m pipeline_infp.evaluate reenactment --manifest ../shared/data/manifest.csv \
        --checkpoint checkpoints/infp-base --json eval.json

`reenactment` (stage 1, the face renderer):
  * self-reenactment: for every `talking` clip of the `val` split (every talking clip when the manifest's
    split column is empty), the first frame with a face is the source and every later frame drives it;
    the output is compared with the real frame over the 256² face crop (SSIM, PSNR, L1). With `--crop fixed`
    (default) every frame is cut with the source frame's crop, as the pipeline animates a portrait: the head
    moves inside a still frame. `--crop tracked` cuts each frame around its own face (smoothed over 0.5 s),
    so the background moves instead. SSIM is also given per region of the real frame (`face_regions`): inside
    its face mesh, around it (hair, ears, neck) and elsewhere (torso, background), because a renderer driven by
    a face mesh can only be expected to get the first two right; and LMD, how far MediaPipe's mesh on the output
    lies from the real frame's (face and lips, every 5th frame): whether the geometry it was given is drawn;
    and, on the same frames, FD: the Fréchet distance between the output's and the real frames' motion features
    (`motion_features`, the space `evaluate motion` uses; from `--features` or `<checkpoint>/motion_features.npz`),
    whole and split into head pose and expression. LMD is per frame and averages out a small systematic
    expression bias (e.g. a mouth drawn a little wider in every frame); FD shows it. And `sharpness` (the function of
    that name): the output's fine detail over the real frame's, 1 = as detailed, because SSIM and PSNR reward
    blur where detail cannot be predicted: a 1.2-px Gaussian blur of the released renderer's output raises its
    SSIM by 0.011 while its Laplacian variance, this ratio's numerator, falls about tenfold;
  * cross-identity: every `portrait` of the manifest is driven by the first `--cross-frames` frames of each
    of those clips; MediaPipe runs on the output frames, and the driver's and the output's mouth- and
    eye-aperture series are correlated (Pearson), with the fraction of output frames where a face is found.
Methods: `static` (the source, unchanged), `mesh warp` (piecewise-affine warp of the source by the driving
face mesh, `processing.mesh_warp`), `prior warp` (the renderer's geometric prior alone: the mesh warp carried
over hair and neck, `processing.prior_warp`, from the driver's own meshes — nothing learned) and `renderer`
(the checkpoint's motion encoder, flow estimator and face decoder; left out when no `--checkpoint` is given).

Clips are streamed: each is decoded twice (face tracking, then cropping) and processed in batches, so memory
does not depend on a clip's resolution and grows by only a few KB per frame (landmarks, per-frame scores).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_infp.motion_features import POSE_DIM, MotionFeatureSpace
from pipeline_infp.motion_metrics import frechet_distance
from pipeline_infp.processing import (
    FaceCrop,
    FaceProcessor,
    INFPInputError,
    NoFaceDetectedError,
    VideoLoadError,
    apply_matrix,
    eye_aperture,
    mouth_aperture,
)
from pipeline_infp.processing.face import _region_indices, crop_to_crop, smoothed_crop_matrices, warp_to_crop
from pipeline_infp.processing.mesh_warp import _inter_ocular, mesh_flow, mesh_warp, prior_warp, retarget_landmarks
from pipeline_infp.processing.video import VideoStream

logger = logging.getLogger(__name__)

METHODS = ("static", "mesh warp", "prior warp", "renderer")
PSNR_CAP = 100.0  # dB, for identical images (MSE 0)
# A full run on the shared data (7 val clips, 3794 driving frames) with all 22 portraits x 50 frames takes ~17 min
# on an idle 2-core CPU with the base renderer (estimated from per-frame costs; 40 min measured while other jobs
# shared the cores): rendering and MediaPipe on the outputs dominate. 12 portraits spread over the list bring it
# to ~12 min; `--cross-portraits all` for every portrait.
DEFAULT_CROSS_PORTRAITS = 12
FACE_FOUND_MIN = 0.99  # the renderer's output must keep a detectable face in at least this fraction of frames
# SSIM is also reported per region of the real frame (`face_regions`): inside the face mesh, around it, elsewhere.
# Torso and background motion ("elsewhere") is not in the driving signal, so its share bounds every renderer.
REGIONS = ("face", "around", "elsewhere")
REGION_KEYS = tuple(f"ssim_{region}" for region in REGIONS)  # their columns in results and the table
# Landmark distance (LMD) between MediaPipe's mesh on the output and on the real frame, on every LMD_STRIDE-th
# driving frame (~760 of the shared val clips' frames per method): does the renderer draw the geometry it was given?
LMD_STRIDE = 5
AROUND = 0.125  # of the crop side (32 px at 256², where the crop is 1.8x the face): hair, ears, neck

# --------------------------------------------------------------------------------------------- metrics
# The evaluation compares uint8 frames, so its metrics are numpy/OpenCV versions of `pipeline_infp.metrics`
# (the differentiable torch metrics training uses) with the same definitions, about 3x faster on CPU and exact
# in their arithmetic; tests/test_evaluate.py checks that the two agree.


def _gaussian_kernel(window: int, sigma: float) -> np.ndarray:
    x = np.arange(window, dtype=np.float64) - (window - 1) / 2
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).astype(np.float32)


def _pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two image batches [B, H, W, C] (single images [H, W, C] get a batch axis) of the same shape and dtype."""
    x, y = np.asarray(x), np.asarray(y)
    x, y = (a[None] if a.ndim == 3 else a for a in (x, y))
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"Expected two image batches [B, H, W, C] of the same shape, got {x.shape} and {y.shape}.")
    if (x.dtype == np.uint8) != (y.dtype == np.uint8):
        raise ValueError(f"Compare uint8 with uint8 or floats in [0, 1] with floats, got {x.dtype} and {y.dtype}.")
    return x, y


def ssim(x: np.ndarray, y: np.ndarray, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """SSIM (Wang et al. 2004) per image [B]: a Gaussian window (11 taps, σ 1.5) over the positions where it
    fits (no padding), per channel, averaged over positions and channels; K1 = 0.01, K2 = 0.03.

    x, y: uint8 images [B, H, W, C] or [H, W, C] (compared as values / 255) or float arrays in [0, 1]. The same
    value as `pipeline_infp.metrics.ssim` and as skimage's `structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1)` averaged over channels. OpenCV filters all maps of a
    batch in one call, in float32, with second moments taken about each image's mean so the rounding error
    stays ~1e-6.
    """
    return ssim_maps(x, y, window, sigma).mean(axis=(1, 2))


def ssim_maps(x: np.ndarray, y: np.ndarray, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """`ssim`'s value at every position where the window fits, averaged over channels: float64
    [B, H − window + 1, W − window + 1] (position (i, j) is the window centred on pixel (i + window // 2,
    j + window // 2)). Its mean over positions is `ssim`."""
    x, y = _pair(x, y)
    num, height, width, channels = x.shape
    if min(height, width) < window:
        raise ValueError(f"Images must be at least {window}x{window} px for SSIM, got {height}x{width}.")
    maps = num * channels

    def planes(a: np.ndarray) -> np.ndarray:  # [H, W, B·C] float32 in [0, 1]
        out = a.transpose(1, 2, 0, 3).reshape(height, width, maps).astype(np.float32)
        return out * np.float32(1 / 255) if a.dtype == np.uint8 else out

    a, b = planes(x), planes(y)
    mean_a, mean_b = a.mean(axis=(0, 1)), b.mean(axis=(0, 1))
    ac, bc = a - mean_a, b - mean_b  # variances about the image mean: less cancellation than E[x²] − μ²
    stack = np.concatenate([a, b, ac * ac, bc * bc, ac * bc], axis=2)  # [H, W, 5·B·C]
    kernel = _gaussian_kernel(window, sigma)
    filtered = np.concatenate(  # OpenCV filters every channel of an array in one call (at most 512)
        [
            cv2.sepFilter2D(np.ascontiguousarray(stack[..., i : i + 500]), cv2.CV_32F, kernel, kernel).reshape(
                height, width, -1
            )
            for i in range(0, stack.shape[2], 500)
        ],
        axis=2,
    )
    half = window // 2  # keep the positions where the whole window fits
    filtered = filtered[half : height - half, half : width - half]
    mu_x, mu_y, xx, yy, xy = (filtered[..., k * maps : (k + 1) * maps] for k in range(5))
    dx, dy = mu_x - mean_a, mu_y - mean_b
    var_x, var_y, cov = xx - dx * dx, yy - dy * dy, xy - dx * dy
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    per_image = ssim_map.reshape(*ssim_map.shape[:2], num, channels).mean(axis=3, dtype=np.float64)
    return per_image.transpose(2, 0, 1)


def face_regions(landmarks: np.ndarray, size: int) -> np.ndarray:
    """Labels uint8 [size, size] of a frame's pixels by what a face mesh can tell about them: 0 inside the mesh
    (mouth included), 1 within `AROUND` × size of it (hair, ears, neck, the background a moving head uncovers),
    2 elsewhere (torso and background). landmarks: [478, 3] pixel coordinates in the crop."""
    _, mask = mesh_flow(landmarks, landmarks, size, fill_mouth=True)
    distance = cv2.distanceTransform((mask == 0).astype(np.uint8), cv2.DIST_L2, 5)
    return np.where(mask > 0, 0, np.where(distance <= AROUND * size, 1, 2)).astype(np.uint8)


def region_ssim(maps: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean SSIM of each `REGIONS` label per image from `ssim_maps` [B, h, w] and `face_regions` labels [B, H, W],
    with the number of window positions each averages: ([B, 3] float64, NaN where a region is empty; [B, 3]
    int64). A position belongs to its window's centre pixel, so the count-weighted mean of the regions is `ssim`."""
    half = (labels.shape[1] - maps.shape[1]) // 2
    centres = np.asarray(labels)[:, half : half + maps.shape[1], half : half + maps.shape[2]]
    bins = (np.arange(len(maps))[:, None, None] * len(REGIONS) + centres).ravel()
    shape = (len(maps), len(REGIONS))
    counts = np.bincount(bins, minlength=shape[0] * shape[1]).reshape(shape)
    sums = np.bincount(bins, weights=maps.ravel(), minlength=shape[0] * shape[1]).reshape(shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan), counts


def landmark_distances(landmarks: np.ndarray, real: np.ndarray) -> tuple[float, float]:
    """Mean 2-D distance between two meshes [478, 3] of one frame, over the 468 face points and over the lips, in
    inter-ocular distances of `real`: (face, mouth). Image positions, not aligned: a misplaced head counts."""
    lips = _region_indices()[1]
    distance = np.linalg.norm(np.asarray(landmarks)[:468, :2] - np.asarray(real)[:468, :2], axis=1)
    scale = _inter_ocular(np.asarray(real))
    return float(distance.mean() / scale), float(distance[lips].mean() / scale)


def motion_fidelity(generated: np.ndarray, real: np.ndarray) -> dict[str, float | None]:
    """Fréchet distance of output vs real motion features [N, D] (`MotionFeatureSpace.transform`): whole, head pose
    (the first `POSE_DIM`) and expression (the rest); None where a set has fewer than 2 frames."""
    if min(len(generated), len(real)) < 2:
        return {"fd": None, "fd_pose": None, "fd_expression": None}
    return {
        "fd": frechet_distance(generated, real),
        "fd_pose": frechet_distance(generated[:, :POSE_DIM], real[:, :POSE_DIM]),
        "fd_expression": frechet_distance(generated[:, POSE_DIM:], real[:, POSE_DIM:]),
    }


def _squared_and_absolute_error(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = _pair(x, y)
    if x.dtype == np.uint8:  # exact integer arithmetic
        diff = (x.astype(np.int16) - y).reshape(len(x), -1)
        return np.square(diff, dtype=np.int32).mean(axis=1) / 255.0**2, np.abs(diff).mean(axis=1) / 255.0
    diff = (x.astype(np.float64) - y).reshape(len(x), -1)
    return np.square(diff).mean(axis=1), np.abs(diff).mean(axis=1)


def sharpness(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fine detail of x relative to y per image [B]: the variance of the Laplacian of the grey image of x over
    that of y (images as for `ssim`). 1 when x is as detailed as y; a blurred x falls towards 0, added noise
    rises above 1. y without any detail (a flat image) gives NaN."""
    x, y = _pair(x, y)

    def detail(images: np.ndarray) -> np.ndarray:
        scale = 1.0 if images.dtype == np.uint8 else 255.0
        grey = (images.astype(np.float32) * scale) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.array([cv2.Laplacian(g, cv2.CV_32F).var(dtype=np.float64) for g in grey])

    reference = detail(y)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(reference > 1e-9, detail(x) / reference, np.nan)


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """PSNR in dB per image [B] over all pixels and channels (images as for `ssim`), capped at 100 dB for
    identical images like `pipeline_infp.metrics.psnr`."""
    mse = _squared_and_absolute_error(x, y)[0]
    return np.minimum(-10 * np.log10(np.maximum(mse, 1e-30)), PSNR_CAP)


def l1(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Mean absolute difference per image [B] (images as for `ssim`, values in [0, 1])."""
    return _squared_and_absolute_error(x, y)[1]


def frame_scores(frames: np.ndarray, real: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    """Per-frame SSIM (overall, and by `face_regions` label under `REGION_KEYS`) and PSNR of frames [B, S, S, 3]
    against the real ones, as the self-reenactment table reports them."""
    frames = np.ascontiguousarray(frames)
    maps = ssim_maps(frames, real)
    scores = {"ssim": maps.mean(axis=(1, 2)).tolist(), "psnr": psnr(frames, real).tolist()}
    for key, values in zip(REGION_KEYS, region_ssim(maps, labels)[0].T):
        scores[key] = values.tolist()
    return scores


def pearson(a, b) -> float:
    """Pearson correlation of two series; 0 when either is constant (or has fewer than 3 points)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


# --------------------------------------------------------------------------------------------- manifest


@dataclass
class Entry:
    id: str
    path: Path
    kind: str
    split: str
    identity: str = ""


def read_manifest(path: str | Path) -> list[Entry]:
    """Rows of a shared-format manifest (id, path relative to the manifest's folder, kind, split, ...)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"id", "path", "kind"} - set(rows[0] if rows else {})
    if rows and missing:
        raise ValueError(f"{path} lacks the columns {sorted(missing)} of the shared manifest format.")
    return [
        Entry(
            id=row["id"],
            path=(path.parent / row["path"]).resolve(),
            kind=(row.get("kind") or "").strip(),
            split=(row.get("split") or "").strip(),
            identity=(row.get("identity") or "").strip(),
        )
        for row in rows
    ]


def spread(items: list, count: int | None) -> list:
    """`count` items spread evenly over the list, first and last included, in order (all when None or more)."""
    if count is None or count >= len(items):
        return list(items)
    if count <= 0:
        return []
    return [items[i] for i in np.unique(np.round(np.linspace(0, len(items) - 1, count)).astype(int))]


def select_clips(entries: list[Entry]) -> tuple[list[Entry], str]:
    """The `val` talking clips; every talking clip when the split column has no values (or no val clip)."""
    talking = [e for e in entries if e.kind == "talking"]
    if not any(e.split for e in entries):
        return talking, "all talking clips (the manifest has no split values)"
    val = [e for e in talking if e.split == "val"]
    if not val and talking:
        logger.warning("No talking clip has split 'val': evaluating every talking clip.")
        return talking, "all talking clips (none has split 'val')"
    return val, "talking clips with split 'val'"


# --------------------------------------------------------------------------------------------- streaming


@dataclass
class ClipTrack:
    """`FaceProcessor.track_video`'s result without the crops (see `track_clip`)."""

    landmarks: np.ndarray  # float32 [T', 478, 3] in crop pixels
    matrices: np.ndarray  # float64 [T', 2, 3] frame pixels -> crop pixels
    indices: np.ndarray  # int64 [T'] kept frame indices
    num_frames: int
    size: int

    @property
    def dropped(self) -> int:
        return self.num_frames - len(self.indices)

    def fixed(self) -> ClipTrack:
        """The same track cut with its first frame's crop throughout (landmarks moved into that crop)."""
        first = self.matrices[0]
        landmarks = np.stack(
            [apply_matrix(pts, crop_to_crop(m, first)) for pts, m in zip(self.landmarks, self.matrices)]
        )
        matrices = np.repeat(first[None], len(self.matrices), axis=0)
        return ClipTrack(landmarks, matrices, self.indices, self.num_frames, self.size)


def track_clip(
    processor: FaceProcessor,
    path: str | Path,
    size: int = 256,
    fps: float = 25.0,
    max_frames: int | None = None,
    scale: float = 1.8,
    smoothing: float = 0.5,
    progress: bool = False,
) -> ClipTrack:
    """`FaceProcessor.track_video(read_video(path, fps, max_frames), size)` in one streaming pass (the same
    per-frame landmarks, smoothed crop squares and crop landmarks; its crop rule through face.py's helpers, as
    training/prepare_data.py does), holding one frame at a time."""
    stream = VideoStream(path, fps, max_frames)
    bar = tqdm(
        stream, desc="track", unit="frame", total=stream.estimated_frames or None, leave=False, disable=not progress
    )
    kept, landmarks, count = processor.track_landmarks(bar)
    if count == 0:
        raise VideoLoadError(f"No frames could be decoded from {path}: the file is empty or corrupt.")
    if not kept:
        raise NoFaceDetectedError(f"No face found in any of the {count} frames of {Path(path).name}.")
    matrices = smoothed_crop_matrices(landmarks, size, scale, max(1, round(smoothing * fps)))
    crop_landmarks = np.stack([apply_matrix(pts, m) for pts, m in zip(landmarks, matrices)])
    return ClipTrack(crop_landmarks, matrices, np.array(kept, dtype=np.int64), count, size)


def iter_crops(
    path: str | Path, track: ClipTrack, fps: float = 25.0, batch_size: int = 16
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Second pass over the clip: (positions in `track` [b], crops uint8 [b, S, S, 3]) in batches."""
    lookup = {int(frame): n for n, frame in enumerate(track.indices)}
    positions, crops = [], []
    last = int(track.indices[-1])
    for i, frame in enumerate(VideoStream(path, fps, last + 1)):
        n = lookup.get(i)
        if n is None:
            continue
        positions.append(n)
        crops.append(warp_to_crop(frame, track.matrices[n], track.size))
        if len(crops) == batch_size:
            yield np.array(positions), np.stack(crops)
            positions, crops = [], []
    if crops:
        yield np.array(positions), np.stack(crops)


# --------------------------------------------------------------------------------------------- methods


class Renderer:
    """The checkpoint's face renderer: portrait encoding once, then motion latents → frames in batches."""

    def __init__(self, pipe, batch_size: int):
        self.pipe, self.batch_size = pipe, batch_size

    def encode_portrait(self, crop: np.ndarray, landmarks: np.ndarray):
        identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        return self.pipe.encode_portrait(FaceCrop(image=crop, landmarks=landmarks, matrix=identity, original=crop))

    def encode_motion(self, crops: np.ndarray, landmarks: np.ndarray, reference: np.ndarray) -> torch.Tensor:
        """Motion latents of driving crops relative to `reference`, the landmarks of the driver's first frame."""
        return torch.cat(
            [
                self.pipe.encode_motion(crops[i : i + self.batch_size], landmarks[i : i + self.batch_size], reference)
                for i in range(0, len(crops), self.batch_size)
            ]
        )

    def render(self, portrait, latents: torch.Tensor) -> np.ndarray:
        """uint8 [T, S, S, 3], quantised like a written video."""
        frames = self.pipe.render(portrait, latents, self.batch_size)
        return (frames.permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().astype(np.uint8)


class Timer:
    """Seconds spent per named part, summed over every `with timer(name):` block."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def _detect_series(processor: FaceProcessor, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MediaPipe on output frames → (found [T] bool, mouth aperture [T], eye aperture [T]; NaN where not found)."""
    found = np.zeros(len(frames), dtype=bool)
    mouth, eye = np.full(len(frames), np.nan), np.full(len(frames), np.nan)
    for t, frame in enumerate(frames):
        try:
            pts = processor.landmarks(frame)
        except NoFaceDetectedError:
            continue
        found[t], mouth[t], eye[t] = True, mouth_aperture(pts), eye_aperture(pts)
    return found, mouth, eye


def _motion_scores(found, mouth, eye, driver_mouth, driver_eye) -> dict:
    return {
        "mouth_corr": pearson(driver_mouth[found], mouth[found]),
        "eye_corr": pearson(driver_eye[found], eye[found]),
        "face_found": float(found.mean()) if len(found) else 0.0,
        "frames": int(len(found)),
        "mouth": mouth.tolist(),  # NaN (null in the JSON) where no face was found
        "eye": eye.tolist(),
    }


def _finite_mean(values: list[float]) -> float:
    """Mean of the finite values (a region can be empty in a frame), NaN when there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _round(value, digits: int = 5):
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_round(v, digits) for v in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return None if not math.isfinite(value) else round(value, digits)
    if isinstance(value, np.integer):
        return int(value)
    return value


# --------------------------------------------------------------------------------------------- reenactment


def self_reenactment(
    entry: Entry,
    processor: FaceProcessor,
    renderer: Renderer | None,
    args: argparse.Namespace,
    timer: Timer,
    keep: int,
    space: MotionFeatureSpace | None = None,
) -> tuple[dict, dict, dict[str, np.ndarray] | None]:
    """Metrics of one clip, the driver data cross-identity needs (first `keep` kept crops/landmarks) and, with a
    motion feature `space`, the motion features [N, D] of the LMD frames per method and of the real frames
    ("real"), pooled over clips for FD."""
    max_frames = None if args.max_frames is None else args.max_frames + 1  # the source + up to max_frames
    with timer("self: face tracking"):
        track = track_clip(processor, entry.path, args.size, args.fps, max_frames, progress=args.progress)
        if args.crop == "fixed":
            track = track.fixed()
    methods = ["static", "mesh warp", "prior warp"] + (["renderer"] if renderer is not None else [])
    per_frame = {
        m: {"ssim": [], "psnr": [], "l1": [], "sharpness": [], **{k: [] for k in REGION_KEYS}} for m in methods
    }
    region_area = []
    lmd = {"frame_index": [], **{m: {"lmd_face": [], "lmd_mouth": []} for m in methods}}
    driver = {"crops": [], "landmarks": track.landmarks[:keep], "indices": track.indices[:keep]}
    # FD compares MediaPipe on output crops with MediaPipe on the real crops (not the full-frame track), so that
    # detection on a 256² crop biases both sides alike; the source crop's mesh anchors head position.
    detected = {name: [] for name in ["real", *methods]}
    source = source_lm = source_detected = portrait = None
    reconstruction = {}
    bar = tqdm(total=len(track.indices), desc=entry.id, unit="frame", leave=False, disable=not args.progress)
    for positions, crops in iter_crops(entry.path, track, args.fps, args.batch_size):
        bar.update(len(positions))
        if sum(len(c) for c in driver["crops"]) < keep:
            driver["crops"].append(crops[: keep - sum(len(c) for c in driver["crops"])])
        if source is None:
            source, source_lm = crops[0], track.landmarks[0]
            if space is not None:
                with timer("self: output landmarks"):
                    try:
                        source_detected = processor.landmarks(source)
                    except NoFaceDetectedError:
                        source_detected = source_lm
            if renderer is not None:
                with timer("self: renderer"):
                    portrait = renderer.encode_portrait(source, source_lm)
            # Sanity: each method given the source's own geometry (static and the warps are exact).
            outputs = {
                "static": source[None],
                "mesh warp": mesh_warp(source, source_lm, source_lm)[None],
                "prior warp": prior_warp(source, source_lm, source_lm)[None],
            }
            if renderer is not None:
                with timer("self: renderer"):
                    outputs["renderer"] = renderer.render(
                        portrait, renderer.encode_motion(source[None], source_lm[None], source_lm)
                    )
            reconstruction = {
                m: {
                    "ssim": ssim(o, source[None]).item(),
                    "psnr": psnr(o, source[None]).item(),
                    "l1": l1(o, source[None]).item(),
                }
                for m, o in outputs.items()
            }
            positions, crops = positions[1:], crops[1:]
            if not len(positions):
                continue
        landmarks = track.landmarks[positions]
        outputs = {}
        with timer("self: static"):
            outputs["static"] = np.broadcast_to(source, crops.shape)
        with timer("self: mesh warp"):
            outputs["mesh warp"] = np.stack([mesh_warp(source, source_lm, lm) for lm in landmarks])
        with timer("self: prior warp"):
            outputs["prior warp"] = np.stack([prior_warp(source, source_lm, lm) for lm in landmarks])
        if renderer is not None:
            with timer("self: renderer"):
                outputs["renderer"] = renderer.render(portrait, renderer.encode_motion(crops, landmarks, source_lm))
        with timer("self: metrics"):
            labels = np.stack([face_regions(lm, args.size) for lm in landmarks])
            region_area += [np.bincount(lab.ravel(), minlength=len(REGIONS)) / lab.size for lab in labels]
            for method, frames in outputs.items():
                frames = np.ascontiguousarray(frames)  # static's is a broadcast view: one copy for every metric
                for key, values in frame_scores(frames, crops, labels).items():
                    per_frame[method][key] += values
                per_frame[method]["l1"] += l1(frames, crops).tolist()
                per_frame[method]["sharpness"] += sharpness(frames, crops).tolist()
        with timer("self: output landmarks"):
            measured = [k for k, position in enumerate(positions) if position % LMD_STRIDE == 0]
            lmd["frame_index"] += track.indices[positions[measured]].tolist()
            if space is not None:
                for k in measured:
                    with contextlib.suppress(NoFaceDetectedError):
                        detected["real"].append(processor.landmarks(crops[k]))
            for method, frames in outputs.items():
                for k in measured:
                    try:
                        found = processor.landmarks(frames[k])
                    except NoFaceDetectedError:  # left out of the means (the face-found check is cross-identity's)
                        face = mouth = float("nan")
                    else:
                        face, mouth = landmark_distances(found, landmarks[k])
                        if space is not None:
                            detected[method].append(found)
                    lmd[method]["lmd_face"].append(face)
                    lmd[method]["lmd_mouth"].append(mouth)
    bar.close()
    driver["crops"] = np.concatenate(driver["crops"]) if driver["crops"] else np.zeros((0, args.size, args.size, 3))
    features = None
    if space is not None:  # each series starts at the source, the origin of the pose features' head position
        features = {name: space.transform(np.stack([source_detected, *lms]))[1:] for name, lms in detected.items()}
    result = {
        "id": entry.id,
        "path": str(entry.path),
        "frames_read": track.num_frames,
        "frames_with_face": int(len(track.indices)),
        "frames_dropped": track.dropped,
        "driving_frames": int(len(track.indices) - 1),
        "source_frame": int(track.indices[0]),
        "methods": {
            m: {k: _finite_mean(v) for k, v in {**series, **lmd[m]}.items()} for m, series in per_frame.items()
        },
        "region_area": dict(zip(REGIONS, np.mean(region_area, axis=0).tolist())) if region_area else None,
        "source_reconstruction": reconstruction,
        "per_frame": {"frame_index": track.indices[1:].tolist(), **per_frame},
        "landmark_distances": lmd,
    }
    return result, driver, features


def cross_identity(
    clip_id: str,
    driver: dict,
    portraits: list[dict],
    processor: FaceProcessor,
    renderer: Renderer | None,
    args: argparse.Namespace,
    timer: Timer,
) -> list[dict]:
    """Every portrait driven by this clip's first frames: motion correlation and face-found rate per method."""
    crops, landmarks = driver["crops"], driver["landmarks"][: len(driver["crops"])]
    if len(crops) == 0:
        return []
    driver_mouth, driver_eye = mouth_aperture(landmarks), eye_aperture(landmarks)
    latents = None
    if renderer is not None:
        with timer("cross: renderer"):
            latents = renderer.encode_motion(crops, landmarks, landmarks[0])
    pairs = []
    for portrait in tqdm(portraits, desc=f"cross {clip_id}", unit="portrait", leave=False, disable=not args.progress):
        scores = {}
        # static: every output frame is the portrait itself, so one detection stands for all of them.
        found, mouth, eye = portrait["detection"]
        n = len(crops)
        scores["static"] = _motion_scores(
            np.repeat(found, n), np.repeat(mouth, n), np.repeat(eye, n), driver_mouth, driver_eye
        )
        with timer("cross: mesh warp"):
            targets = retarget_landmarks(portrait["landmarks"], landmarks, landmarks[0])
            frames = np.stack([mesh_warp(portrait["crop"], portrait["landmarks"], lm) for lm in targets])
        with timer("cross: output landmarks"):
            scores["mesh warp"] = _motion_scores(*_detect_series(processor, frames), driver_mouth, driver_eye)
        with timer("cross: prior warp"):
            frames = np.stack([prior_warp(portrait["crop"], portrait["landmarks"], lm) for lm in targets])
        with timer("cross: output landmarks"):
            scores["prior warp"] = _motion_scores(*_detect_series(processor, frames), driver_mouth, driver_eye)
        if renderer is not None:
            with timer("cross: renderer"):
                frames = renderer.render(portrait["encoding"], latents)
            with timer("cross: output landmarks"):
                scores["renderer"] = _motion_scores(*_detect_series(processor, frames), driver_mouth, driver_eye)
        pairs.append(
            {
                "portrait": portrait["id"],
                "clip": clip_id,
                "frames": n,
                "frame_index": driver["indices"][:n].tolist(),
                "driver": {"mouth": driver_mouth.tolist(), "eye": driver_eye.tolist()},
                "methods": scores,
            }
        )
    return pairs


def _prepare_portraits(
    entries: list[Entry], processor: FaceProcessor, renderer: Renderer | None, args, timer: Timer
) -> tuple[list[dict], list[dict]]:
    portraits, skipped = [], []
    for entry in entries:
        try:
            with timer("cross: portrait crops"):
                crop = processor.crop_portrait(entry.path, size=args.size)
        except (INFPInputError, OSError) as error:
            skipped.append({"id": entry.id, "path": str(entry.path), "error": str(error)})
            logger.warning("Skipping portrait %s: %s", entry.id, error)
            continue
        with timer("cross: output landmarks"):
            found, mouth, eye = _detect_series(processor, crop.image[None])
        portrait = {
            "id": entry.id,
            "crop": crop.image,
            "landmarks": crop.landmarks,
            "detection": (found, mouth, eye),
            "encoding": None,
        }
        if renderer is not None:
            with timer("cross: renderer"):
                portrait["encoding"] = renderer.encode_portrait(crop.image, crop.landmarks)
        portraits.append(portrait)
    return portraits, skipped


def _summarise(clips: list[dict], pairs: list[dict], features: list[dict[str, np.ndarray]]) -> dict:
    """Per method: means over clips and pairs, and FD over the motion features pooled from every clip."""
    summary = {}
    real = np.concatenate([f["real"] for f in features]) if features else None
    for method in METHODS:
        row = {}
        generated = [f[method] for f in features if method in f]
        if generated:
            row.update(motion_fidelity(np.concatenate(generated), real))
        per_clip = [c["methods"][method] for c in clips if method in c["methods"]]
        for key in ("ssim", "psnr", "l1", "sharpness", *REGION_KEYS, "lmd_face", "lmd_mouth"):
            values = [v[key] for v in per_clip if math.isfinite(v[key])]
            row[key] = float(np.mean(values)) if values else None
        scores = [p["methods"][method] for p in pairs if method in p["methods"]]
        row["mouth_corr"] = float(np.mean([s["mouth_corr"] for s in scores])) if scores else None
        row["eye_corr"] = float(np.mean([s["eye_corr"] for s in scores])) if scores else None
        total = sum(s["frames"] for s in scores)
        row["face_found"] = sum(s["face_found"] * s["frames"] for s in scores) / total if total else None
        row["clips"], row["pairs"] = len(per_clip), len(scores)
        if per_clip or scores:
            summary[method] = row
    return summary


def _area_note(clips: list[dict]) -> str:
    areas = [c["region_area"] for c in clips if c.get("region_area")]
    if not areas:
        return "no frames"
    return " / ".join(f"{np.mean([a[r] for a in areas]):.0%}" for r in REGIONS)


def format_table(summary: dict, note: str = "") -> str:
    columns = [
        ("SSIM ↑", "ssim", "{:.4f}"),
        ("PSNR ↑", "psnr", "{:.2f}"),
        ("L1 ↓", "l1", "{:.4f}"),
        ("sharpness ≈1", "sharpness", "{:.2f}"),
        *((f"SSIM {region} ↑", key, "{:.4f}") for region, key in zip(REGIONS, REGION_KEYS)),
        ("LMD face ↓", "lmd_face", "{:.4f}"),
        ("LMD mouth ↓", "lmd_mouth", "{:.4f}"),
        ("FD ↓", "fd", "{:.2f}"),
        ("FD pose ↓", "fd_pose", "{:.3f}"),
        ("FD expr ↓", "fd_expression", "{:.2f}"),
        ("mouth corr ↑", "mouth_corr", "{:+.3f}"),
        ("eye corr ↑", "eye_corr", "{:+.3f}"),
        ("face found", "face_found", "{:.1%}"),
    ]
    header = ["method"] + [c[0] for c in columns]
    rows = [
        [method] + [("—" if row.get(key) is None else fmt.format(row[key])) for _, key, fmt in columns]
        for method, row in summary.items()
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return (
            "| "
            + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    return "\n".join(out) + (f"\n{note}" if note else "")


def write_json(path: str | Path, results: dict) -> None:
    """Results as readable UTF-8 JSON (names keep their accents), the folder made when missing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1, ensure_ascii=False)
    print(f"wrote {path}")


def _machine(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _feature_space(args: argparse.Namespace) -> tuple[MotionFeatureSpace | None, Path | None]:
    """(space, its file): `--features`, else the checkpoint's motion_features.npz when it has one (without
    either: no FD columns)."""
    if args.features:
        if not Path(args.features).is_file():
            raise SystemExit(
                f"--features {args.features}: no such file. Give a motion feature space .npz (`evaluate motion` "
                "saves one beside the checkpoint) or leave the option out."
            )
        return MotionFeatureSpace.load(args.features), Path(args.features)
    path = Path(args.checkpoint) / "motion_features.npz" if args.checkpoint else None
    if path is not None and path.is_file():
        return MotionFeatureSpace.load(path), path
    logger.info("No motion feature space (no --features, none in the checkpoint): the FD columns are left out.")
    return None, None


def run_reenactment(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    timer = Timer()
    entries = read_manifest(args.manifest)
    clips, selection = select_clips(entries)
    portrait_entries = [e for e in entries if e.kind == "portrait"]
    portrait_entries = spread(portrait_entries, args.cross_portraits)

    space, space_path = _feature_space(args)  # before anything slow: a wrong --features path fails at once
    renderer = None
    if args.checkpoint:
        from pipeline_infp.pipeline_infp import INFPPipeline

        with timer("load checkpoint"):
            pipe = INFPPipeline.from_pretrained(args.checkpoint).to(args.device)
            pipe.set_progress_bar_config(disable=True)
        renderer = Renderer(pipe, args.batch_size)
    torch.manual_seed(0)

    clip_results, pairs, skipped_clips, clip_features = [], [], [], []
    with FaceProcessor() as processor:
        portraits, skipped_portraits = (
            _prepare_portraits(portrait_entries, processor, renderer, args, timer)
            if args.cross_frames > 0
            else ([], [])
        )
        for entry in tqdm(clips, desc="clips", unit="clip", disable=not args.progress):
            try:
                result, driver, features = self_reenactment(
                    entry, processor, renderer, args, timer, keep=args.cross_frames, space=space
                )
            except (INFPInputError, OSError) as error:
                skipped_clips.append({"id": entry.id, "path": str(entry.path), "error": str(error)})
                logger.warning("Skipping clip %s: %s", entry.id, error)
                continue
            clip_results.append(result)
            if features is not None:
                clip_features.append(features)
            if portraits:
                pairs += cross_identity(entry.id, driver, portraits, processor, renderer, args, timer)

    summary = _summarise(clip_results, pairs, clip_features)
    wall = time.perf_counter() - start
    note = (
        f"Self-reenactment (SSIM, PSNR, L1 at {args.size}² over the {args.crop} face crop, mean of per-clip means): "
        f"{len(clip_results)} clips, {sum(c['driving_frames'] for c in clip_results)} driving frames. "
        f"SSIM by region of the real frame: inside its face mesh, within {AROUND:g} x the crop side of it, "
        f"elsewhere ({_area_note(clip_results)} of the crop on average). LMD: mean distance of MediaPipe's mesh on "
        f"the output from the real frame's, face and lips, in inter-ocular distances, every {LMD_STRIDE}th frame. "
        f"Sharpness: variance of the output's Laplacian over the real frame's (1 = as much fine detail; a blurred "
        f"output scores SSIM and PSNR up but falls here). "
        + (
            f"FD: Fréchet distance of the output's motion features (MediaPipe, same frames) from the real frames', "
            f"pooled over clips; pose = the first {POSE_DIM} features (head angles, position, scale), "
            f"expr = the rest. "
            if space is not None
            else ""
        )
        + f"Cross-identity (Pearson correlation of driver vs output mouth/eye aperture measured by MediaPipe, "
        f"mean over pairs; a constant output series counts as 0, so `static` is 0 by construction): "
        f"{len(portraits)} portraits x {len(clip_results)} clips, first {args.cross_frames} frames. "
        f"Wall time {wall:.0f} s."
    )
    checks = {}
    found = summary.get("renderer", {}).get("face_found")
    if found is not None:
        checks["renderer_face_found"] = {"value": found, "min": FACE_FOUND_MIN, "ok": found >= FACE_FOUND_MIN}
        if found < FACE_FOUND_MIN:
            note += f"\nFAILED: MediaPipe finds a face in only {found:.1%} of the renderer's cross-identity frames."
    results = {
        "command": "reenactment",
        "manifest": str(Path(args.manifest).resolve()),
        "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
        "clip_selection": selection,
        "clips": [e.id for e in clips],
        "portraits": [p["id"] for p in portraits],
        "settings": {
            "size": args.size,
            "crop": args.crop,
            "fps": args.fps,
            "max_frames": args.max_frames,
            "cross_frames": args.cross_frames,
            "cross_portraits": args.cross_portraits,
            "motion_features": str(space_path.resolve()) if space_path else None,
            "batch_size": args.batch_size,
            "device": args.device,
            "ssim": "Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid positions, per RGB channel then mean",
            "psnr_cap_db": PSNR_CAP,
            "images": "uint8 RGB crops scaled to [0, 1]; renderer output quantised to uint8",
        },
        "machine": _machine(args.device),
        "wall_time_s": wall,
        "timings_s": dict(timer.seconds),
        "summary": summary,
        "checks": checks,
        "table": format_table(summary, note),
        "self_reenactment": clip_results,
        "cross_identity": pairs,
        "skipped": {"clips": skipped_clips, "portraits": skipped_portraits},
    }
    results = _round(results)
    print(format_table(summary, note))
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(timer.seconds.items())))
    if args.json:
        write_json(args.json, results)
    return results


# --------------------------------------------------------------------------------------------- CLI


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _count_or_all(text: str) -> int | None:
    return None if text.strip().lower() == "all" else _non_negative_int(text)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline_infp.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub = commands.add_parser(
        "reenactment",
        help="face renderer: self-reenactment (SSIM/PSNR/L1) and cross-identity (motion correlation) vs baselines",
        description="Self-reenactment on the val talking clips and cross-identity driving of the portraits.",
    )
    sub.add_argument("--manifest", required=True, help="manifest.csv in the shared data format")
    sub.add_argument("--checkpoint", help="pipeline folder (INFPPipeline.from_pretrained); without it only baselines")
    sub.add_argument("--json", help="write every result here")
    sub.add_argument("--size", type=_positive_int, default=256, help="face crop side (default 256)")
    sub.add_argument(
        "--crop",
        choices=["fixed", "tracked"],
        default="fixed",
        help="fixed: every frame cut with the source frame's crop (the head moves, as in the pipeline's output); "
        "tracked: each frame cut around its own face (the background moves). Default fixed",
    )
    sub.add_argument(
        "--features",
        help="motion feature space .npz for the FD columns (default <checkpoint>/motion_features.npz when present)",
    )
    sub.add_argument("--fps", type=float, default=25.0, help="clips are resampled to this rate (default 25)")
    sub.add_argument("--max-frames", type=_positive_int, help="cap on driving frames per clip (default: all)")
    sub.add_argument(
        "--cross-frames",
        type=_non_negative_int,
        default=50,
        help="driving frames per clip for cross-identity (0: skip)",
    )
    sub.add_argument(
        "--cross-portraits",
        type=_count_or_all,
        default=DEFAULT_CROSS_PORTRAITS,
        help=f"number of portraits for cross-identity, spread evenly over the manifest's list, or 'all' "
        f"(default {DEFAULT_CROSS_PORTRAITS}: keeps a full run on the shared data under ~15 min on 2 CPU cores)",
    )
    sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sub.add_argument("--batch-size", type=_positive_int, default=16, help="frames per renderer batch")
    sub.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    sub.set_defaults(handler=run_reenactment)

    from pipeline_infp import evaluate_motion, evaluate_screen

    evaluate_motion.add_parser(commands)
    evaluate_screen.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse the command line, run the sub-command and return its results."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    main()
    sys.exit(0)
