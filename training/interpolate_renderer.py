#!/usr/bin/env python
"""Weight-space ensembling of a stage-1 fine-tune with the renderer it started from (WiSE-FT, Wortsman et al.,
CVPR 2022; `interpolate_motion.py` does the same for stage 2): the four renderer components' weights become
base + alpha * (fine-tuned - base), with the fine-tune's configs (its `person_prior`, say); the motion model, the
style presets and the evaluation's feature space are the base folder's.

Why: a renderer fine-tuned on our tens of identities gains in self-reenactment and loses some of what carries over
to unseen faces (cross-identity mouth correlation, expression fidelity); halfway between the two keeps much of both
(model card).

    python training/interpolate_renderer.py --base checkpoints/infp-base --finetuned runs/head/pipeline \\
        --alpha 0.5 --warp_lock_margin 0.1 --output_dir runs/renderer-wise

`--component_alpha appearance_encoder=1` moves one component by its own amount, since the gain and the loss need
not sit in the same network: on the rigid-prior fine-tune the cross-identity mouth follows the flow estimator and
the pixels mostly the appearance encoder; the closed mouth while listening follows the appearance encoder too
(model card).

The weights keep the base's dtype. A fine-tune made with `--freeze motion_encoder` keeps the motion encoder, so
the base's stage-2 model stays valid; one that trained it changes the motion latents' space, and the motion model
must be retrained (`prepare_motion.py`, `train_motion.py`).
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from interpolate_motion import check_alpha, checked_interpolation_args, interpolate, interpolation_parser  # noqa: E402
from train_head_imitation import RENDERER  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


def parse_args(argv=None) -> argparse.Namespace:
    parser = interpolation_parser(
        __doc__.split("\n\n")[0], "folder with the fine-tuned renderer's four components", "the interpolated pipeline"
    )
    parser.add_argument("--warp_lock_margin", type=float, help="the face decoder's warp lock (default: fine-tuned's)")
    parser.add_argument(
        "--component_alpha", nargs="+", default=[], metavar="NAME=ALPHA",
        help=f"a component's own alpha instead of --alpha (components: {', '.join(RENDERER)})",
    )  # fmt: skip
    args = checked_interpolation_args(parser, argv)
    args.alphas = dict.fromkeys(RENDERER, args.alpha)
    for item in args.component_alpha:
        name, _, value = item.partition("=")
        if name not in RENDERER:
            parser.error(f"--component_alpha {item}: name one of {', '.join(RENDERER)}, as NAME=ALPHA")
        try:
            args.alphas[name] = float(value)
        except ValueError:
            parser.error(f"--component_alpha {item}: the alpha after '=' must be a number from 0 to 1")
        check_alpha(parser, f"--component_alpha {item}", args.alphas[name])
    for folder in (args.base, args.finetuned):
        missing = [name for name in RENDERER if not (Path(folder) / name / WEIGHTS).is_file()]
        if missing:
            parser.error(f"{folder} has no {', '.join(missing)} weights: pass folders written by the training scripts")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    base, tuned, output_dir = Path(args.base), Path(args.finetuned), Path(args.output_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    shutil.copytree(base, output_dir)
    for name in RENDERER:
        start = load_file(base / name / WEIGHTS)
        mixed = interpolate(start, load_file(tuned / name / WEIGHTS), args.alphas[name])
        save_file({k: v.to(start[k].dtype) for k, v in mixed.items()}, output_dir / name / WEIGHTS, {"format": "pt"})
        config = json.loads((tuned / name / "config.json").read_text())
        config.pop("_name_or_path", None)
        if name == "face_decoder" and args.warp_lock_margin is not None:
            config["warp_lock_margin"] = args.warp_lock_margin
        (output_dir / name / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shares = ", ".join(f"{name} {alpha:g}" for name, alpha in args.alphas.items())
    print(f"wrote {output_dir}: renderer from {args.base} towards {args.finetuned} by {shares}")
    return output_dir


if __name__ == "__main__":
    main()
