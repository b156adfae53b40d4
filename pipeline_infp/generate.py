"""Command-line generator: portrait + own voice (+ partner voice) → mp4 with sound.

    python -m pipeline_infp.generate --portrait face.jpg --self-audio me.wav --other-audio you.wav \
        --checkpoint checkpoints/infp-base --out out.mp4
    python -m pipeline_infp.generate --portrait face.jpg --conversation call.wav --agent-speaker 2 \
        --checkpoint checkpoints/infp-base --out out.mp4

`--conversation` takes one recording of two people and splits it by voice (`processing.diarize`); speaker 1 is
whoever speaks first.
"""

import argparse
import sys
import time

import torch

from pipeline_infp.pipeline_infp import DEFAULT_GUIDANCE_SCALE, DEFAULT_SILENT_MOUTH_REST, INFPPipeline
from pipeline_infp.presets import build_pipeline
from pipeline_infp.processing import INFPInputError, load_audio, write_video
from pipeline_infp.processing.diarize import conversation_tracks


def add_silent_mouth_argument(parser: argparse.ArgumentParser) -> None:
    def strength(text: str) -> float:
        value = float(text)
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
        return value

    parser.add_argument("--silent-mouth-rest", type=strength, default=DEFAULT_SILENT_MOUTH_REST,
                        help="how firmly the lips rest while the agent's own track is silent: 1 closed, 0 as the "
                             "motion model generates them (default %(default)s)")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--portrait", required=True, help="photo with one clearly visible face")
    voices = parser.add_mutually_exclusive_group(required=True)
    voices.add_argument("--self-audio", help="the agent's own voice (any common audio format)")
    voices.add_argument("--conversation", help="one recording of both people, split into two tracks by voice")
    parser.add_argument("--other-audio", help="the partner's voice (with --self-audio); silence when left out")
    parser.add_argument(
        "--agent-speaker", type=int, choices=[1, 2], default=1, help="with --conversation: which speaker is the agent"
    )
    parser.add_argument("--out", required=True, help="output .mp4")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="pipeline folder or Hub repo id")
    source.add_argument(
        "--random-preset", choices=["tiny", "base"], help="random weights of this size (plumbing and speed checks)"
    )
    parser.add_argument("--style", help="style preset name or reference clip")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per window")
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="side of the rendered face crop")
    parser.add_argument("--paste-back", action="store_true", help="paste the face back into the full portrait")
    parser.add_argument("--keep-portrait-mouth", dest="close_mouth", action="store_false",
                        help="animate a portrait's parted lips as they are instead of closing them first")  # fmt: skip
    add_silent_mouth_argument(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.conversation and args.other_audio:
        parser.error("--other-audio goes with --self-audio; --conversation already holds both voices")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.checkpoint:
        pipe = INFPPipeline.from_pretrained(args.checkpoint)
    else:
        pipe = build_pipeline(args.random_preset, whisper_weights=args.random_preset == "base")
    pipe = pipe.to(args.device)
    start = time.perf_counter()
    try:
        if args.conversation:
            own, other = conversation_tracks(load_audio(args.conversation, name="conversation"), args.agent_speaker)
        else:
            own, other = args.self_audio, args.other_audio
        out = pipe(
            args.portrait,
            own,
            other,
            style=args.style,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator(args.device).manual_seed(args.seed),
            image_size=args.size,
            paste_back=args.paste_back,
            close_mouth=args.close_mouth,
            silent_mouth_rest=args.silent_mouth_rest,
            output_type="np",
        )
    except INFPInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    write_video(args.out, out.frames, out.fps, out.audio)
    seconds = len(out.frames) / out.fps
    print(f"wrote {args.out}: {len(out.frames)} frames ({seconds:.2f} s) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
