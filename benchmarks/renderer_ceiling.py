"""How far a warping face renderer could go on the self-reenactment metrics, by rows that see the real frame.

    python benchmarks/renderer_ceiling.py --manifest ../shared/data/manifest.csv --json ceiling.json

On the same clips, crops and metrics as `python -m pipeline_infp.evaluate reenactment` (the val talking clips,
first frame as source, fixed 256² crop; SSIM overall and by region, PSNR), every `--stride`-th driving frame:
* `static`: the source repeated (the evaluation's baseline, for reference);
* `working size round trip`: the real frame shrunk to the renderer's working size and enlarged back: what
  synthesising at that size alone costs;
* `prior warp`: the source warped by the renderer's geometric prior (`processing.prior_flow` between the two face
  meshes), as the evaluation's row of that name; `person prior warp`: the same with the source's person mask (the
  prior of renderers trained with `--person_prior`), with the head's 2-D affine motion or, `rigid person prior
  warp`, its 3-D rigid motion (`--head_motion rigid`); none of them sees the real frame;
* `flow oracle on the head`: the source warped by the dense optical flow (OpenCV DIS) computed from the real driving
  frame inside its face mesh and the band around it (hair, ears, neck: the evaluation's `face` and `around`
  regions), the prior elsewhere: what a renderer that got the whole head right, but knew no more than a face mesh
  tells about the torso and background, would reach by warping alone;
* `part affine oracle`: the rigid person prior, except that each part of the person the face mesh does not cover
  (hair and ears: the band around the mesh above the chin; neck: that band below it; torso: the rest of the person,
  all where the real frame shows the person) moves by the one affine motion that best fits the optical flow there:
  a renderer that knew how each of these parts moves as a whole (6 numbers a part a frame, none of them in a face
  mesh) but not how it deforms;
* `flow oracle on the person`: that optical flow wherever the real frame shows the person (MediaPipe selfie
  segmentation), the background held still: a renderer that got head, hair and torso right and, like every
  renderer here, keeps the portrait's background where it is;
* `flow oracle`: that optical flow everywhere: a renderer whose flow were right for the background too.
The oracles see the answer, so they are ceilings, not baselines. Per clip, `background motion` is the median
length (pixels of the crop) of the optical flow where neither frame shows the person: near 0 for a still camera,
larger where the camera pans or the video was cut to follow the face, which no face mesh tells a renderer.
"""

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from pipeline_infp.evaluate import (
    REGION_KEYS,
    face_regions,
    frame_scores,
    iter_crops,
    read_manifest,
    select_clips,
    track_clip,
)
from pipeline_infp.processing import FaceProcessor
from pipeline_infp.processing.mesh_warp import prior_flow

METHODS = (
    "static",
    "working size round trip",
    "prior warp",
    "person prior warp",
    "rigid person prior warp",
    "flow oracle on the head",
    "part affine oracle",
    "flow oracle on the person",
    "flow oracle",
)


def round_trip(image: np.ndarray, working: int) -> np.ndarray:
    size = image.shape[0]
    small = cv2.resize(image, (working, working), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)


def optical_flow(source: np.ndarray, driving: np.ndarray) -> np.ndarray:
    """DIS optical flow [S, S, 2] in pixels from every driving pixel to where its content is in the source."""
    grey = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in (driving, source)]
    return cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM).calc(grey[0], grey[1], None)


def warp(source: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """The source [S, S, 3] resampled at every pixel + its flow [S, S, 2] (pixels)."""
    size = source.shape[0]
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size)), axis=-1).astype(np.float32) + flow
    return cv2.remap(source, grid[..., 0], grid[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def background_motion(flow: np.ndarray, source_person: np.ndarray, driving_person: np.ndarray) -> float:
    """Median length (pixels) of the optical flow [S, S, 2] where neither frame's person mask [S, S] reaches 0.5;
    NaN when the person fills the frame."""
    background = (source_person < 0.5) & (driving_person < 0.5)
    return float(np.median(np.linalg.norm(flow[background], axis=-1))) if background.any() else float("nan")


def part_affine_flow(
    prior: np.ndarray, oracle: np.ndarray, labels: np.ndarray, driving_person: np.ndarray, min_pixels: int = 30
) -> np.ndarray:
    """`prior` flow [S, S, 2] with each person part outside the face mesh moved by the least-squares affine fit
    of the `oracle` flow [S, S, 2] over it. Parts (by `face_regions` `labels` [S, S] where `driving_person` [S, S]
    reaches 0.5): the band around the mesh above its lowest row (hair, ears), that band below it (neck), and
    the rest of the person further out (mostly torso). Parts under `min_pixels` keep the prior."""
    size = labels.shape[0]
    person = driving_person >= 0.5
    face_rows = np.flatnonzero((labels == 0).any(axis=1))
    below_chin = (np.arange(size) > (face_rows.max() if len(face_rows) else size))[:, None]
    parts = [(labels == 1) & person & ~below_chin, (labels == 1) & person & below_chin, (labels == 2) & person]
    ys, xs = np.mgrid[:size, :size]
    flow = prior.astype(np.float32, copy=True)
    for part in parts:
        if part.sum() < min_pixels:
            continue
        positions = np.stack([xs[part], ys[part], np.ones(part.sum())], axis=1).astype(np.float64)
        affine = np.linalg.lstsq(positions, oracle[part].astype(np.float64), rcond=None)[0]  # [3, 2]
        flow[part] = positions @ affine
    return flow


def warps(
    source: np.ndarray, driving: np.ndarray, lm_source, lm_driving, person, driving_person, labels: np.ndarray
) -> tuple[dict, float]:
    """The warped rows for one driving frame: the priors (without and with the source's `person` mask, the latter
    with either head motion), oracle on the head (`face_regions` labels 0 and 1), the rigid person prior with one
    affine per person part (`part_affine_flow`), oracle on the person
    (`driving_person` ≥ 0.5, zero flow elsewhere), oracle; and the frame's `background_motion`."""
    size = source.shape[0]

    def pixels(**kwargs) -> np.ndarray:
        return prior_flow(lm_source, lm_driving, size, **kwargs)[0].transpose(1, 2, 0) * size / 2

    prior, rigid = pixels(), pixels(person_mask=person, head_motion="rigid")
    oracle = optical_flow(source, driving)
    on_head = np.where((labels <= 1)[..., None], oracle, prior)
    on_person = np.where((driving_person >= 0.5)[..., None], oracle, 0.0).astype(np.float32)
    rows = {
        "prior warp": warp(source, prior),
        "person prior warp": warp(source, pixels(person_mask=person)),
        "rigid person prior warp": warp(source, rigid),
        "flow oracle on the head": warp(source, on_head),
        "part affine oracle": warp(source, part_affine_flow(rigid, oracle, labels, driving_person)),
        "flow oracle on the person": warp(source, on_person),
        "flow oracle": warp(source, oracle),
    }
    return rows, background_motion(oracle, person, driving_person)


def clip_ceiling(processor: FaceProcessor, path: Path, args: argparse.Namespace) -> dict:
    max_frames = None if args.max_frames is None else args.max_frames + 1
    track = track_clip(processor, path, args.size, 25.0, max_frames).fixed()
    scores = {m: {"ssim": [], "psnr": [], **{k: [] for k in REGION_KEYS}} for m in METHODS}
    shifts = []
    source = None
    for positions, crops in iter_crops(path, track, 25.0):
        if source is None:
            source = crops[0]
            person = processor.person_mask(source)
        keep = [k for k, position in enumerate(positions) if position > 0 and position % args.stride == 0]
        if not keep:
            continue
        real, landmarks = crops[keep], track.landmarks[positions[keep]]
        labels = np.stack([face_regions(lm, args.size) for lm in landmarks])
        warped = []
        for x, lm, label in zip(real, landmarks, labels):
            rows, shift = warps(source, x, track.landmarks[0], lm, person, processor.person_mask(x), label)
            warped.append(rows)
            shifts.append(shift)
        outputs = {
            "static": np.broadcast_to(source, real.shape),
            "working size round trip": np.stack([round_trip(x, args.working_size) for x in real]),
            **{method: np.stack([w[method] for w in warped]) for method in warped[0]},
        }
        for method, frames in outputs.items():
            for key, values in frame_scores(frames, real, labels).items():
                scores[method][key] += values
    frames = len(scores["static"]["ssim"])
    return {
        "frames": frames,
        "background_motion": float("nan") if np.isnan(shifts).all() else float(np.nanmedian(shifts)),
        "methods": {m: {k: float(np.nanmean(v)) for k, v in s.items()} for m, s in scores.items()},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True, help="manifest.csv in the shared data format")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--stride", type=int, default=4, help="every n-th driving frame (default 4)")
    parser.add_argument("--max-frames", type=int, help="cap on frames read per clip (default: all)")
    parser.add_argument("--size", type=int, default=256, help="face crop side, as the evaluation's (default 256)")
    parser.add_argument("--working-size", type=int, default=128, help="the renderer's working size (default 128)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    clips, selection = select_clips(read_manifest(args.manifest))
    results = {}
    with FaceProcessor() as processor:
        for entry in tqdm(clips, desc="clips", unit="clip"):
            results[entry.id] = clip_ceiling(processor, entry.path, args)
    scored = [r for r in results.values() if r["frames"]]
    if not scored:
        raise ValueError(f"No driving frames were scored in {args.manifest}: lower --stride or raise --max-frames.")
    mean = {
        m: {k: float(np.mean([r["methods"][m][k] for r in scored])) for k in scored[0]["methods"][m]} for m in METHODS
    }
    print(f"{selection}: {len(scored)} clips, every {args.stride}th frame, mean of per-clip means")
    print(f"{'method':26s}" + "".join(f"{k:>16s}" for k in mean["static"]))
    for method, figures in mean.items():
        print(f"{method:26s}" + "".join(f"{v:16.4f}" for v in figures.values()))
    print(f"\n{'clip':32s}{'background motion px':>22s}{'SSIM / PSNR, flow oracle on the person':>40s}")
    for clip, result in results.items():
        person = result["methods"]["flow oracle on the person"]
        print(f"{clip:32s}{result['background_motion']:22.2f}{person['ssim']:32.4f} / {person['psnr']:5.2f}")
    output = {"clips": results, "mean": mean, "stride": args.stride, "seconds": time.perf_counter() - start}
    if args.json:
        Path(args.json).write_text(json.dumps(output, indent=1))
    return output


if __name__ == "__main__":
    main()
