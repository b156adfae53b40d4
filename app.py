"""Gradio demo of open INFP: one portrait + the agent's own voice + the partner's voice → a talking and listening head.

    python app.py                      # serves http://127.0.0.1:7860 on the bundled checkpoints/infp-base

Runs as a Hugging Face Space with ZeroGPU (where the `spaces` package is installed) and locally on CPU or GPU
without it. Environment: INFP_CHECKPOINT (pipeline folder or Hub repo id), INFP_MAX_SECONDS (longest audio
accepted, default 20 s: ZeroGPU quotas are small), GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (Gradio's own).
"""

import os
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import matplotlib
import numpy as np
import torch

from pipeline_infp import INFPPipeline
from pipeline_infp.motion_metrics import speaking_state
from pipeline_infp.pipeline_infp import DEFAULT_GUIDANCE_SCALE, DEFAULT_SILENT_MOUTH_REST
from pipeline_infp.processing import (
    SAMPLE_RATE,
    FaceCrop,
    INFPInputError,
    check_duration,
    load_audio,
    mouth_aperture,
    voice_activity,
    write_video,
)
from pipeline_infp.processing.diarize import conversation_tracks

matplotlib.use("Agg")  # figures are rendered to images for the browser; no display here
import matplotlib.pyplot as plt  # noqa: E402

try:
    import spaces  # ZeroGPU: a GPU is attached only while a decorated function runs
except ImportError:
    spaces = None

ROOT = Path(__file__).resolve().parent
CHECKPOINT = os.environ.get("INFP_CHECKPOINT", str(ROOT / "checkpoints" / "infp-base"))
MAX_SECONDS = float(os.environ.get("INFP_MAX_SECONDS", "20"))
EXAMPLES = ROOT / "examples"
TWO_TRACKS, ONE_FILE = "Two tracks (agent + partner)", "One conversation file"
SPEAKERS = ["Speaker 1 (speaks first)", "Speaker 2"]
NO_STYLE = "none"
# Gradio streams video output through ffmpeg and ffprobe (on Spaces from packages.txt); without them the video
# comes whole at the end.
LIVE_STREAMING = bool(shutil.which("ffmpeg") and shutil.which("ffprobe"))
# Gradio serves copies of the output files from its own cache (pruned by `delete_cache`), so a request's own
# folder is only needed until its output is sent; older ones are removed when a new request starts.
KEEP_REQUEST_FILES_S = 3600

_pipeline: INFPPipeline | None = None


def request_folder() -> Path:
    """A new folder for one request's files (concurrent visitors never share or overwrite files), under one
    parent in the temporary-files folder; request folders older than KEEP_REQUEST_FILES_S are removed first, so
    a long-running Space does not fill its disk."""
    parent = Path(tempfile.gettempdir()) / "infp-requests"
    parent.mkdir(exist_ok=True)
    cutoff = time.time() - KEEP_REQUEST_FILES_S
    for old in parent.iterdir():
        if old.stat().st_mtime < cutoff:
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=parent))


def get_pipeline() -> INFPPipeline:
    """The pipeline, loaded once per process. On ZeroGPU it is moved to "cuda" at start-up (the GPU is attached
    inside `@spaces.GPU` calls); elsewhere it runs on the GPU when there is one."""
    global _pipeline
    if _pipeline is None:
        pipe = INFPPipeline.from_pretrained(CHECKPOINT)
        if spaces is not None or torch.cuda.is_available():
            pipe = pipe.to("cuda")
        _pipeline = pipe
    return _pipeline


def style_choices(pipe: INFPPipeline) -> list[str]:
    presets = pipe.motion_guider.style_preset_names if pipe.motion_guider is not None else []
    return [NO_STYLE, *[name for name in presets if name != NO_STYLE]]


# Inputs ----------------------------------------------------------------------------------------------


def _seconds(audio: np.ndarray) -> float:
    return len(audio) / SAMPLE_RATE


def resolve_tracks(mode, own_audio, partner_audio, conversation, agent_speaker) -> tuple[np.ndarray, np.ndarray]:
    """The agent's and the partner's tracks (16 kHz mono) from two files, or from one file split by speaker."""
    if mode == ONE_FILE:
        if not conversation:
            raise gr.Error("Give the conversation recording, or switch to two tracks.")
        mixed = load_audio(conversation, name="conversation")
        _check_length(mixed, "conversation")
        return conversation_tracks(mixed, SPEAKERS.index(agent_speaker) + 1)
    if not own_audio:
        raise gr.Error("Give the agent's own voice (upload a file or record one); the partner's voice is optional.")
    own = load_audio(own_audio, name="agent's voice")
    _check_length(own, "agent's voice")
    if not partner_audio:
        return own, np.zeros_like(own)
    partner = load_audio(partner_audio, name="partner's voice")
    _check_length(partner, "partner's voice")
    return own, partner


def _check_length(audio: np.ndarray, name: str) -> None:
    """The demo's own limit (generate turns the error into a message in the page)."""
    remedy = "trim it, or run the app yourself with a higher INFP_MAX_SECONDS (or `python -m pipeline_infp.generate`)."
    check_duration(audio, MAX_SECONDS, name, remedy)


def gpu_seconds(portrait, mode, own_audio, partner_audio, conversation, agent_speaker, style, style_clip, steps,
                *settings, **kwargs) -> int:  # fmt: skip
    """ZeroGPU time to reserve (called with the same inputs as `generate`): grows with the audio length and the
    number of steps. An estimate: a request that runs out of time fails, one that asks for too much queues longer."""
    path = conversation if mode == ONE_FILE else own_audio
    try:
        seconds = min(_seconds(load_audio(path)), MAX_SECONDS) if path else 0.0
    except INFPInputError:
        seconds = 0.0  # the run itself reports the problem
    return int(min(120, 15 + 2 * seconds * max(1.0, float(steps) / 20)))


# Generation ------------------------------------------------------------------------------------------


def generated_speaking_state(pipe: INFPPipeline, face: FaceCrop, motion_latents: torch.Tensor) -> np.ndarray:
    """Whether the generated face talks, per frame: its lips move like speech (read from the mesh it is rendered
    with: the generated motion from the portrait at rest)."""
    rendered = motion_latents + pipe.rest_motion(face.landmarks).to(motion_latents)
    mouth = mouth_aperture(pipe.motion_landmarks(face.landmarks, rendered))
    return speaking_state(mouth, pipe.fps)


def timeline_figure(own_activity, partner_activity, talking, fps: float):
    """Who speaks when (both voices) and what the generated face does, on one time axis."""
    rows = [("agent's voice", own_activity, "tab:blue"), ("partner's voice", partner_activity, "tab:orange"),
            ("generated: talking", talking, "tab:green")]  # fmt: skip
    figure, axis = plt.subplots(figsize=(8, 1.9), layout="constrained")
    for row, (_, active, colour) in enumerate(rows):
        active = np.concatenate([[0], np.asarray(active, dtype=np.int8), [0]])
        edges = np.flatnonzero(np.diff(active))
        spans = [(start / fps, (stop - start) / fps) for start, stop in zip(edges[::2], edges[1::2])]
        axis.broken_barh(spans, (len(rows) - 1 - row - 0.35, 0.7), color=colour)
    axis.set_yticks(range(len(rows)), [label for label, _, _ in reversed(rows)])
    axis.set_ylim(-0.6, len(rows) - 0.4)
    axis.set_xlim(0, max(len(talking), 1) / fps)
    axis.set_xlabel("seconds")
    axis.grid(axis="x", alpha=0.3)
    return figure


def _generate(
    portrait, mode, own_audio, partner_audio, conversation, agent_speaker, style, style_clip, steps, guidance_scale,
    silent_mouth_rest, seed, size, full_portrait, progress=gr.Progress(),  # noqa: B008 (Gradio injects progress)
):  # fmt: skip
    """Yields (live video chunk, whole video, timeline): with live streaming, each window's frames as an mp4 chunk
    as soon as they are rendered (`INFPPipeline.stream`), then the whole video and the timeline."""
    if not portrait:
        raise gr.Error("Upload a portrait (one clearly visible face) or pick an example.")
    pipe = get_pipeline()
    if pipe.motion_guider is None:
        raise gr.Error(f"The checkpoint {CHECKPOINT} has no audio-to-motion model (stage 2); load a complete one.")
    folder = request_folder()
    try:
        progress(0.0, desc="Reading the audio")
        # As the pipeline takes them (equal lengths; both silent is an error), for the stream too.
        tracks = resolve_tracks(mode, own_audio, partner_audio, conversation, agent_speaker)
        own, partner = pipe.prepare_audio(*tracks, None)
        progress(0.05, desc="Finding the face")
        face = pipe.prepare_portrait(portrait, int(size))
        windows = pipe.num_windows(round(_seconds(own) * pipe.fps))
        settings = dict(
            style=style_clip or (None if style == NO_STYLE else style), num_inference_steps=int(steps),
            guidance_scale=float(guidance_scale), silent_mouth_rest=float(silent_mouth_rest),
            generator=torch.Generator(pipe.device).manual_seed(int(seed)), image_size=int(size),
            paste_back=bool(full_portrait),
        )  # fmt: skip
        if LIVE_STREAMING:
            pieces = []
            for index, piece in enumerate(pipe.stream(face, [(own, partner)], **settings)):
                pieces.append(piece)
                progress(0.1 + 0.8 * min(1.0, len(pieces) / windows), desc="Generating, window by window")
                chunk = write_video(folder / f"live-{index:03d}.mp4", piece.frames, pipe.fps, piece.audio)
                yield chunk, gr.skip(), gr.skip()
            frames = np.concatenate([piece.frames for piece in pieces])
            audio = np.concatenate([piece.audio for piece in pieces])
            motion_latents = torch.cat([piece.motion_latents for piece in pieces])
        else:

            def report(_pipe, step, _timestep, tensors):
                progress(0.1 + 0.8 * (step + 1) / (windows * int(steps)), desc="Generating motion")
                return tensors

            result = pipe(face, own, partner, output_type="np", callback_on_step_end=report, **settings)
            frames, audio, motion_latents = result.frames, result.audio, result.motion_latents
    except Exception as error:
        shutil.rmtree(folder, ignore_errors=True)  # a refused or failed request leaves no folder behind
        if isinstance(error, INFPInputError):
            raise gr.Error(str(error)) from None
        raise
    progress(0.95, desc="Writing the video")
    path = write_video(folder / "infp.mp4", frames, pipe.fps, audio)
    activity = [voice_activity(track, len(frames), fps=pipe.fps) > 0.5 for track in (own, partner)]
    talking = generated_speaking_state(pipe, face, motion_latents)
    figure = timeline_figure(*activity, talking, pipe.fps)
    plt.close(figure)
    yield gr.skip(), path, figure


generate = spaces.GPU(duration=gpu_seconds)(_generate) if spaces is not None else _generate


def generate_example(portrait, own_audio, partner_audio):
    """The examples with the default settings: the whole video and the timeline."""
    *_, (_, video, timeline) = generate(portrait, TWO_TRACKS, own_audio, partner_audio, None, SPEAKERS[0], NO_STYLE,
                                        None, 20, DEFAULT_GUIDANCE_SCALE, DEFAULT_SILENT_MOUTH_REST, 0, 256,
                                        False)  # fmt: skip
    return video, timeline


# Interface -------------------------------------------------------------------------------------------


def build_demo(pipe: INFPPipeline | None = None) -> gr.Blocks:
    pipe = pipe or get_pipeline()
    # delete_cache: as often as that, Gradio's copies of uploads and outputs older than KEEP_REQUEST_FILES_S go.
    cleanup = (KEEP_REQUEST_FILES_S, KEEP_REQUEST_FILES_S)
    with gr.Blocks(title="open INFP: interactive talking and listening head", delete_cache=cleanup) as demo:
        gr.Markdown(
            "# open INFP: a portrait that talks and listens\n"
            "Give one portrait and two voices: the agent's own and its conversation partner's. The face talks, with "
            "its lips on the words, while its own voice is active, and listens (closed mouth, nods, blinks) while the "
            "partner speaks. An open implementation of INFP (CVPR 2025), trained on a few minutes of data: expect "
            "research-quality results.\n\n"
            "**Only animate faces you have the right to use, with the person's consent. Do not use this to "
            "impersonate anyone.** Generated videos are synthetic; say so when you share them."
        )
        with gr.Row():
            with gr.Column():
                portrait = gr.Image(
                    label="Portrait", type="filepath", sources=["upload", "clipboard"], elem_id="portrait"
                )
                mode = gr.Radio([TWO_TRACKS, ONE_FILE], value=TWO_TRACKS, label="Audio")
                with gr.Group(visible=True) as two_tracks:
                    own_audio = gr.Audio(
                        label="Agent's own voice",
                        type="filepath",
                        sources=["upload", "microphone"],
                        elem_id="own-audio",
                    )
                    partner_audio = gr.Audio(
                        label="Partner's voice (optional)", type="filepath", sources=["upload", "microphone"],
                        elem_id="partner-audio",
                    )  # fmt: skip
                with gr.Group(visible=False) as one_file:
                    conversation = gr.Audio(
                        label="Conversation of two people in one recording", type="filepath",
                        sources=["upload", "microphone"],
                    )  # fmt: skip
                    agent_speaker = gr.Radio(SPEAKERS, value=SPEAKERS[0], label="Which speaker is the agent?")
                    gr.Markdown(
                        "The file is split by voice: this works for two people taking turns with clearly different "
                        "voices (a man and a woman, say), less well for similar voices. Check the split on the "
                        "timeline; if it is wrong, give two tracks."
                    )
                mode.change(
                    lambda m: (gr.update(visible=m == TWO_TRACKS), gr.update(visible=m == ONE_FILE)),
                    mode, [two_tracks, one_file],
                )  # fmt: skip
                with gr.Accordion("Settings", open=False):
                    style = gr.Dropdown(style_choices(pipe), value=NO_STYLE, label="Style preset")
                    style_clip = gr.Video(label="Or a style reference clip (how the agent should move)")
                    steps = gr.Slider(5, 50, value=20, step=1, label="Denoising steps")
                    guidance_scale = gr.Slider(1.0, 5.0, DEFAULT_GUIDANCE_SCALE, step=0.1, label="Guidance scale")
                    silent_mouth_rest = gr.Slider(
                        0.0, 1.0, DEFAULT_SILENT_MOUTH_REST, step=0.1, label="Lips at rest while the agent is silent",
                        info="1: closed while it listens; 0: the mouth as the motion model makes it",
                    )  # fmt: skip
                    seed = gr.Number(0, precision=0, label="Seed")
                    size = gr.Radio([256, 512], value=256, label="Face size (pixels)")
                    full_portrait = gr.Checkbox(False, label="Paste the face back into the full portrait")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                live = gr.Video(
                    label="Live: each window as soon as it is generated", streaming=True, autoplay=True,
                    visible=LIVE_STREAMING, elem_id="live",
                )  # fmt: skip
                video = gr.Video(label="Result", autoplay=not LIVE_STREAMING, elem_id="result")
                timeline = gr.Plot(label="Who speaks when, and what the face does", elem_id="timeline")
        inputs = [portrait, mode, own_audio, partner_audio, conversation, agent_speaker, style, style_clip, steps,
                  guidance_scale, silent_mouth_rest, seed, size, full_portrait]  # fmt: skip
        run.click(generate, inputs, [live, video, timeline])
        examples = example_rows()
        if examples:
            gr.Examples(
                examples, [portrait, own_audio, partner_audio], [video, timeline], fn=generate_example,
                cache_examples=True, cache_mode="lazy",
            )  # fmt: skip
    return demo


def example_rows() -> list[list[str]]:
    """Each example portrait with the example conversation (see examples/README.md for where they come from)."""
    pair = [EXAMPLES / "conversation-man.wav", EXAMPLES / "conversation-woman.wav"]
    portraits = sorted(EXAMPLES.glob("portrait-*"))
    return [[str(p), *map(str, pair)] for p in portraits] if all(path.is_file() for path in pair) else []


if __name__ == "__main__":
    build_demo().queue(max_size=20).launch()
