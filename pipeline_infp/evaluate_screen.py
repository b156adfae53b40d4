"""`python -m pipeline_infp.evaluate motion-screen`: a few minutes' look at a stage-2 checkpoint, for choosing
among training runs before the full `motion` evaluation judges the one worth it.

The items are `motion`'s (val talking clips, every side of every `dual-audio` pair), generated with the same
settings, but nothing is rendered: the motion latents become the face meshes the renderer would be driven to
(`INFPPipeline.motion_landmarks`, with the portrait's rest motion), and the mouth is measured on those meshes.
Reported: the mouth-aperture correlation with the real clip on its speech (lag 0 and lag-searched, as in
`motion`), and where only the partner speaks the fraction of frames with a closed mouth and with the mouth at
rest (opened less than 0.05 inter-ocular distances beyond the rest mesh's). These are the motion model's
figures, not the video's: on the shared data, over six stage-2 checkpoints, the lip sync ranked them as
`motion` does, 0.01-0.02 below the rendered figure; the closed fraction sat above the rendered one (the renderer
closes an open-mouthed portrait only part of the way), ranked alike (Spearman 0.94); the rest fraction sat far
below (the rendered face does not show a mesh's small openings) and ranks them only loosely (0.71).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_infp.evaluate import _machine, _round, read_manifest, write_json
from pipeline_infp.evaluate_motion import (
    LISTENING_KEYS,
    _table,
    add_generation_arguments,
    conversation_items,
    first_frame_face,
    load_motion_pipeline,
    mean_over_items,
    mouth_correlations,
    side_listening,
    track_items,
)
from pipeline_infp.processing import FaceProcessor, mouth_aperture, voice_activity

logger = logging.getLogger(__name__)


def driven_mouth(pipe, face, own: np.ndarray, partner: np.ndarray, args) -> tuple[np.ndarray, float]:
    """The inner-lip gap per generated frame of the meshes the renderer would be driven to, and the rest mesh's."""
    out = pipe(face, own, partner, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
               generator=torch.Generator().manual_seed(args.seed), window_overlap=args.window_overlap,
               close_mouth=args.close_mouth, silent_mouth_rest=args.silent_mouth_rest,
               output_type="latent")  # fmt: skip
    portrait = pipe.encode_portrait(face, close_mouth=args.close_mouth)
    latents = out.motion_latents.float().cpu()
    latents = torch.cat([torch.zeros_like(latents[:1]), latents])  # the rest mesh first
    if portrait.rest is not None:
        latents = latents + portrait.rest.float().cpu()
    mouth = mouth_aperture(pipe.motion_landmarks(portrait.landmarks, latents))
    return mouth[1:], float(mouth[0])


def screen_item(pipe, item: dict, args) -> dict:
    """One item's figures: lip sync against the real clip (talking) or listening fractions (dual)."""
    if item["kind"] == "talking":
        mouth, _ = driven_mouth(pipe, first_frame_face(item), item["audio"], np.zeros_like(item["audio"]), args)
        keep = item["indices"][item["indices"] < len(mouth)]
        vad = voice_activity(item["audio"], len(mouth), fps=pipe.fps)
        record = {"mouth": mouth[keep]}
        truth = {"mouth": mouth_aperture(item["landmarks"][: len(keep)]), "own_vad": vad[keep]}
        [(corr, _)] = mouth_correlations([record], [truth])
        [(searched, lag)] = mouth_correlations([record], [truth], args.sync_search)
        return {"id": item["id"], "kind": "talking", "mouth_corr": corr, "mouth_corr_lag_searched": searched,
                "lag": lag}  # fmt: skip
    mouth, rest = driven_mouth(pipe, item["portrait"], item["audio"], item["partner"], args)
    return {"id": item["id"], "kind": "dual"} | side_listening(mouth, rest, item["audio"], item["partner"], pipe.fps)


def summarise_screen(rows: list[dict]) -> dict:
    """Means over the items that have each figure."""
    return mean_over_items(rows, ("mouth_corr", "mouth_corr_lag_searched", *LISTENING_KEYS))


def run_screen(args: argparse.Namespace) -> dict:
    start_time = time.perf_counter()
    entries = read_manifest(args.manifest)
    pipe = load_motion_pipeline(args)
    with FaceProcessor() as processor:
        val = [dict(item, kind="talking") for item in track_items(entries, processor, args, "val")]
        items = val + conversation_items(entries, processor, args)
    if not items:
        raise ValueError(f"{args.manifest} has no val talking clip and no dual-audio pair with a portrait.")
    progress = tqdm(items, desc="items", unit="item", disable=not args.progress)
    rows = [screen_item(pipe, item, args) for item in progress]
    summary = summarise_screen(rows)
    cells = [("—" if summary[k] is None else fmt.format(summary[k])) for k, fmt in (
        ("mouth_corr", "{:+.3f}"), ("mouth_corr_lag_searched", "{:+.3f}"), ("closed_mouth_listening", "{:.1%}"),
        ("rest_mouth_listening", "{:.1%}"))]  # fmt: skip
    header = ["mesh mouth corr ↑", "lag searched ↑", "closed mouth listening ↑", "rest mouth listening ↑"]
    table = _table(header, [cells]) + (
        f"\n{len(val)} val talking clips and {len(items) - len(val)} dual-audio sides, at most {args.max_seconds:g} s "
        f"each, {args.steps} DDIM steps, guidance {args.guidance_scale}; measured on the driving meshes, nothing "
        f"rendered. Wall time {time.perf_counter() - start_time:.0f} s."
    )
    print(table)
    out = _round({
        "command": "motion-screen",
        "manifest": str(Path(args.manifest).resolve()),
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "settings": {k: v for k, v in vars(args).items() if k != "handler"},
        "machine": _machine(args.device),
        "summary": summary,
        "items": rows,
        "table": table,
    })  # fmt: skip
    if args.json:
        write_json(args.json, out)
    return out


def add_parser(commands) -> None:
    sub = commands.add_parser(
        "motion-screen",
        help="minutes: lip sync and listening mouth of the generated motion, measured on its meshes (no rendering)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_generation_arguments(sub)
    sub.set_defaults(handler=run_screen)
