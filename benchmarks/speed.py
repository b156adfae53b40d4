"""Speed of each stage of the pipeline and of the whole, on this machine.

    python benchmarks/speed.py --json speed.json                       # CPU here, CUDA on a GPU machine
    python benchmarks/speed.py --checkpoint checkpoints/infp-base --seconds 10 --dtypes fp32 bf16 --runs 3

Stages, in the pipeline's order: face crop (MediaPipe), portrait (appearance and motion encoding), audio
encoding (Whisper on both tracks), guide (motion guider), motion generation (every window's DDIM loop with
classifier-free guidance), rendering, video writing; then end to end (one `pipe(...)` call plus writing the
mp4). Each is run `--warmup` times untimed, then `--runs` times; medians are reported. Frames per second are
video frames (25 fps) per second of compute; first-frame latency is the time until the first frame could be
shown without streaming (face crop + portrait + audio encoding + guide + the first window's motion + rendering
one frame). Streaming (`INFPPipeline.stream`, the audio fed in `--chunk-seconds` chunks as fast as it is
taken): seconds until the first window's frames, and sustained frames per second over the whole stream.
Peak memory: CUDA's allocator peak, or the process's peak resident size on CPU. Each variant's end-to-end video is
compared with the fp32 one without fast paths (same seed): largest motion-latent difference and mean pixel
difference (0-255), so a speed-up that changes the output shows.
"""

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline_infp import INFPPipeline
from pipeline_infp.generate import add_silent_mouth_argument
from pipeline_infp.pipeline_infp import DEFAULT_GUIDANCE_SCALE
from pipeline_infp.processing import SAMPLE_RATE, load_audio, voice_activity, write_video

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, runs: int, warmup: int) -> tuple[float, object]:
    """Median seconds of `runs` calls after `warmup` untimed ones, and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def machine(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(), "device": device}  # fmt: skip
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def tracks(seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """The example conversation looped to `seconds`: own and partner voices."""
    own, partner = (load_audio(ROOT / "examples" / f"conversation-{who}.wav") for who in ("man", "woman"))
    length = round(seconds * SAMPLE_RATE)
    return tuple(np.resize(track, length).astype(np.float32) for track in (own, partner))


def apply_fast_paths(pipe: INFPPipeline, compile_models: bool, channels_last: bool) -> str:
    """Optional speed-ups, in place: the renderer's convolutions in channels-last memory format, and
    `torch.compile` on the networks that run per window and per frame. Returns their names for the table."""
    names = []
    if channels_last:
        for model in (pipe.appearance_encoder, pipe.flow_estimator, pipe.face_decoder):
            model.to(memory_format=torch.channels_last)
        names.append("channels-last")
    if compile_models:
        for model in (pipe.motion_transformer, pipe.flow_estimator, pipe.face_decoder):
            model.compile()
        names.append("compile")
    return "".join(f"+{name}" for name in names)


def end_to_end_output(pipe: INFPPipeline, args, own, partner, overlap: int):
    return pipe(str(args.portrait), own, partner, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                generator=torch.Generator(args.device).manual_seed(0), image_size=args.size,
                render_batch_size=args.render_batch_size, window_overlap=overlap,
                silent_mouth_rest=args.silent_mouth_rest, output_type="np")  # fmt: skip


def deviation(out, reference) -> dict:
    """How far a variant's video is from the fp32 eager one with the same seed."""
    latents = (out.motion_latents.float().cpu() - reference.motion_latents.float().cpu()).abs()
    pixels = np.abs(out.frames.astype(np.float64) - reference.frames) * 255
    return {"latents max": round(float(latents.max()), 6), "pixels mean": round(float(pixels.mean()), 4),
            "pixels max": round(float(pixels.max()), 3)}  # fmt: skip


def benchmark(pipe: INFPPipeline, args, dtype_name: str) -> tuple[dict, object]:
    """The variant's figures, and its end-to-end output (to compare with the reference afterwards)."""
    device, runs, warmup = args.device, args.runs, args.warmup
    pipe = pipe.to(device, DTYPES[dtype_name])
    pipe.set_progress_bar_config(disable=True)
    variant = dtype_name + apply_fast_paths(pipe, args.compile, args.channels_last)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    own, partner = tracks(args.seconds)
    overlap = pipe.resolve_window_overlap(args.window_overlap)
    own_padded, partner_padded, num_frames, padded = pipe.pad_to_windows(own, partner, overlap)
    window = pipe.motion_transformer.config.window_size
    num_windows = pipe.num_windows(num_frames, overlap)
    generator = torch.Generator(device)
    times = {}

    times["face crop"], face = timed(
        lambda: pipe.prepare_portrait(str(args.portrait), args.size), device, runs, warmup
    )
    times["portrait"], portrait = timed(lambda: pipe.encode_portrait(face), device, runs, warmup)
    times["audio encoding"], features = timed(
        lambda: pipe.encode_audio(own_padded, partner_padded, padded), device, runs, warmup
    )
    activity = np.stack([voice_activity(x, padded, fps=pipe.fps) for x in (own_padded, partner_padded)])
    times["guide"], (motion_features, _) = timed(
        lambda: pipe.guide(features, torch.from_numpy(activity).to(device), None), device, runs, warmup
    )
    motion_features = motion_features.to(pipe.motion_transformer.dtype)
    mouth_rest_weights = pipe.silent_mouth_weights(activity[0], args.silent_mouth_rest)

    def motion(frames: int):
        """The windows covering the first `frames` of the padded frames (`padded`: all; `window`: the first)."""
        generator.manual_seed(0)
        weights = None if mouth_rest_weights is None else mouth_rest_weights[:frames]
        return pipe.denoise_windows(
            portrait, motion_features[:, :frames], None, args.steps, args.guidance_scale, 1.0, generator, 0.0, overlap,
            mouth_rest_weights=weights,
        )[:num_frames]  # fmt: skip

    times["motion generation"], latents = timed(lambda: motion(padded), device, runs, warmup)
    times["first window motion"], _ = timed(lambda: motion(window), device, runs, warmup)
    times["rendering"], frames = timed(
        lambda: pipe.render(portrait, latents, args.render_batch_size), device, runs, warmup
    )
    times["render one frame"], _ = timed(lambda: pipe.render(portrait, latents[:1], 1), device, runs, warmup)
    video = frames.permute(0, 2, 3, 1).float().cpu().numpy()
    mixed = (own + partner)[: round(num_frames / pipe.fps * SAMPLE_RATE)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out.mp4"
        times["video writing"], _ = timed(lambda: write_video(path, video, pipe.fps, mixed), device, runs, warmup)

        def end_to_end():
            out = end_to_end_output(pipe, args, own, partner, overlap)
            write_video(path, out.frames, out.fps, out.audio)
            return out

        times["end to end"], out = timed(end_to_end, device, runs, warmup)

    def streaming():
        """Seconds until the first window's frames (once its audio has arrived), and for the whole stream."""
        chunk = round(args.chunk_seconds * SAMPLE_RATE)
        pieces = ((own[i : i + chunk], partner[i : i + chunk]) for i in range(0, len(own), chunk))
        start, first = time.perf_counter(), None
        stream = pipe.stream(face, pieces, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                             generator=generator.manual_seed(0), render_batch_size=args.render_batch_size,
                             window_overlap=overlap, silent_mouth_rest=args.silent_mouth_rest)  # fmt: skip
        for _ in stream:
            sync(device)
            first = first if first is not None else time.perf_counter() - start
        return first, time.perf_counter() - start

    for _ in range(warmup):
        streaming()
    first_window, total = (statistics.median(values) for values in zip(*[streaming() for _ in range(runs)]))

    first_frame = sum(
        times[k]
        for k in ("face crop", "portrait", "audio encoding", "guide", "first window motion", "render one frame")
    )
    per_frame_stages = ("audio encoding", "guide", "motion generation", "rendering", "video writing", "end to end")
    return {
        "variant": variant,
        "dtype": dtype_name,
        "frames": num_frames,
        "seconds": {k: round(v, 4) for k, v in times.items()},
        "fps": {k: round(num_frames / times[k], 2) for k in per_frame_stages},
        "motion ms per window": round(1000 * times["motion generation"] / num_windows, 2),
        "first frame latency s": round(first_frame, 3),
        "streaming first window s": round(first_window, 3),
        "streaming fps": round(num_frames / total, 2),
        "peak memory MB": round(peak_memory_mb(device), 1),
    }, out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "infp-base"))
    parser.add_argument("--portrait", default=ROOT / "examples" / "portrait-s1.jpg")
    parser.add_argument("--seconds", type=float, default=10.0, help="audio length (the example conversation looped)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--render-batch-size", type=int, default=16)
    parser.add_argument("--window-overlap", type=int, help="frames shared by windows (default: the pipeline's)")
    add_silent_mouth_argument(parser)
    parser.add_argument("--chunk-seconds", type=float, default=0.2, help="audio chunk size fed to the stream")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true", help="renderer convolutions in channels-last")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer and the renderer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    results, outputs = [], []
    for name in args.dtypes:
        try:
            row, out = benchmark(INFPPipeline.from_pretrained(args.checkpoint), args, name)
            results.append(row)
            outputs.append(out)
        except (RuntimeError, NotImplementedError) as error:  # an op without a kernel for this dtype/device
            results.append({"dtype": name, "unsupported": str(error).splitlines()[0]})
    # Every variant's video against fp32 without fast paths, same seed; after the timings, so that their peak
    # memory is the variants' own.
    pipe = INFPPipeline.from_pretrained(args.checkpoint).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    own, partner = tracks(args.seconds)
    reference = end_to_end_output(pipe, args, own, partner, pipe.resolve_window_overlap(args.window_overlap))
    for row, out in zip([r for r in results if "unsupported" not in r], outputs):
        row["deviation from fp32"] = deviation(out, reference)
    print(f"{args.seconds:g} s of audio, {args.steps} DDIM steps with CFG, {args.size}² on {args.device}")
    print("| variant | audio fps | motion fps | render fps | writing fps | end-to-end fps | first frame s "
          "| stream first window s | stream fps | peak MB | Δ latents max | Δ pixels mean |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "unsupported" in r:
            print(f"| {r['dtype']} | unsupported: {r['unsupported']} |")
            continue
        f, d = r["fps"], r["deviation from fp32"]
        cells = [r["variant"], f["audio encoding"], f["motion generation"], f["rendering"], f["video writing"],
                 f["end to end"], r["first frame latency s"], r["streaming first window s"], r["streaming fps"],
                 r["peak memory MB"], d["latents max"], d["pixels mean"]]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    out = {"machine": machine(args.device), "settings": {k: str(v) for k, v in vars(args).items()}, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
