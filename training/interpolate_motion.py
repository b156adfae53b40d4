#!/usr/bin/env python
"""Weight-space ensembling of a stage-2 fine-tune with the model it started from (WiSE-FT, Wortsman et al.,
CVPR 2022): the motion guider's and transformer's weights become base + alpha * (fine-tuned - base); the renderer,
the style presets and the evaluation's feature space are the base folder's.

Why: fine-tuning the own-voice path on our 12 minutes of talking (`train_motion.py --trainable ...`) makes the
lips follow the voice more closely where sound and picture agree, but it sharpens the model towards those few
clips; halfway between the two keeps most of the gain and the base model's robustness (model card).

    python training/interpolate_motion.py --base checkpoints/infp-base --finetuned runs/motion-own/pipeline \
        --alpha 0.5 --output_dir runs/motion-wise

Both folders must share the renderer (the motion latents are its motion encoder's) and the style encoder (the
presets are its vectors); `train_motion.py --init_from BASE` fine-tunes keep both unless told to train them.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_head_imitation import RENDERER  # noqa: E402
from train_motion import MOTION_MODEL, export_pipeline  # noqa: E402

from pipeline_infp import INFPPipeline  # noqa: E402

FEATURES_FILE = "motion_features.npz"  # fitted on the data, not the model (evaluate motion)


def interpolation_parser(description: str, finetuned_help: str, output_help: str) -> argparse.ArgumentParser:
    """The arguments this script and `interpolate_renderer.py` share (checked by `checked_interpolation_args`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--base", required=True, help="pipeline folder the fine-tune started from")
    parser.add_argument("--finetuned", required=True, help=finetuned_help)
    parser.add_argument("--alpha", type=float, required=True, help="0: the base model, 1: the fine-tuned one")
    parser.add_argument("--output_dir", required=True, help=output_help)
    return parser


def check_alpha(parser: argparse.ArgumentParser, given: str, alpha: float) -> None:
    """Refuse an interpolation weight outside [0, 1]; `given` names the argument as the user wrote it."""
    if not 0.0 <= alpha <= 1.0:
        parser.error(f"{given}: choose a value from 0 (base) to 1 (fine-tuned)")


def checked_interpolation_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    check_alpha(parser, f"--alpha {args.alpha}", args.alpha)
    if Path(args.output_dir).resolve() in (Path(args.base).resolve(), Path(args.finetuned).resolve()):
        parser.error("--output_dir must be a new folder: it is replaced, and the inputs are read from disk")
    return args


def parse_args(argv=None) -> argparse.Namespace:
    parser = interpolation_parser(
        __doc__.split("\n\n")[0],
        "pipeline folder written by train_motion.py",
        "the interpolated pipeline (fp16 Hub folder)",
    )
    return checked_interpolation_args(parser, argv)


def interpolate(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> dict:
    """State dict base + alpha (tuned - base), in float32; tensors that are not floating point must agree."""
    if base.keys() != tuned.keys():
        raise ValueError(f"The two models have different layers: {sorted(base.keys() ^ tuned.keys())}")
    mixed = {}
    for key, start in base.items():
        end = tuned[key]
        if start.shape != end.shape:
            raise ValueError(f"{key}: shape {tuple(start.shape)} in the base, {tuple(end.shape)} fine-tuned")
        if start.is_floating_point():
            mixed[key] = start.float() + alpha * (end.float() - start.float())
        elif torch.equal(start, end):
            mixed[key] = start
        else:
            raise ValueError(f"{key}: integer values differ between the two models and cannot be interpolated")
    return mixed


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k].float(), theirs[k].float()) for k in ours)


def architecture(model) -> dict:
    return {k: v for k, v in model.config.items() if not k.startswith("_") and k != "style_presets"}


def check_compatible(base: INFPPipeline, tuned: INFPPipeline) -> None:
    for name in MOTION_MODEL:
        if getattr(base, name) is None or getattr(tuned, name) is None:
            raise ValueError(f"Both folders need a trained {name}: train stage 2 first (training/train_motion.py).")
        if architecture(getattr(base, name)) != architecture(getattr(tuned, name)):
            raise ValueError(f"The two {name}s have different configs: only a fine-tune of the base interpolates.")
    for name in RENDERER:
        if not same_weights(getattr(base, name), getattr(tuned, name)):
            raise ValueError(
                f"The two folders have different {name} weights: their motion latents are not the same space. "
                "Interpolate a fine-tune made with --renderer pointing at the base folder."
            )
    if not same_weights(base.motion_guider.style_encoder, tuned.motion_guider.style_encoder):
        raise ValueError(
            "The fine-tune changed the style encoder, so the base's style presets would not fit the mix. "
            "Fine-tune with the style encoder frozen (train_motion.py --trainable ...)."
        )


def main(argv=None) -> Path:
    args = parse_args(argv)
    base, tuned = INFPPipeline.from_pretrained(args.base), INFPPipeline.from_pretrained(args.finetuned)
    check_compatible(base, tuned)
    for name in MOTION_MODEL:
        model = getattr(base, name)
        model.float().load_state_dict(interpolate(model.state_dict(), getattr(tuned, name).state_dict(), args.alpha))
    output_dir = Path(args.output_dir)
    export_pipeline(base, output_dir)
    if (Path(args.base) / FEATURES_FILE).is_file():
        shutil.copyfile(Path(args.base) / FEATURES_FILE, output_dir / FEATURES_FILE)
    print(f"wrote {output_dir}: motion model {args.alpha:g} of the way from {args.base} to {args.finetuned}")
    return output_dir


if __name__ == "__main__":
    main()
