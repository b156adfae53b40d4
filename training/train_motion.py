#!/usr/bin/env python
"""Stage 2 of INFP: audio-guided motion generation on two tracks (the agent's own voice and the partner's).

The interactive motion guider and the motion transformer learn to denoise windows of motion latents
(`training/prepare_motion.py` computes them with the stage-1 motion encoder) from the Whisper features of
both tracks, the previous window's last frames and a style vector. Real two-person video is almost absent
from the shared data, so dyadic windows are built from one-sided clips:
- talking clips: own track = the clip's speech; partner track = silence, or (after the warm-up) speech from
  another recording placed only in the clip's own pauses (turn taking), and now and then over its speech
  (both talking at once);
- listening clips (non-verbal clips whose mouth does not move like speech; talking-without-audio clips are
  left out, or the model would learn to mouth words while listening): own track = silence, partner track =
  speech, so the face learns not to move its lips for the partner's voice and to show non-verbal motion.
The first `--warmup_steps` use one-sided windows only (partner silent for talking clips), which initialises
the verbal and non-verbal memory banks separately, as the paper does.

Denoising loss (the transformer predicts the clean latents, see `presets.make_scheduler`); AdamW (lr 1e-4,
weight decay 1e-2); the style vector is zeroed with p = 0.3 and the motion features and previous-window
latents are dropped with p = 0.5 each (classifier-free guidance).

Style: a clip's latents are relative to its own most neutral frame, so an emotion clip alone does not show its
emotion. `expression_offsets` measures each MEAD emotion clip's lasting expression against the same person's
neutral clip; with p = `--expression_prob` a window and its style reference are both moved by one of those
offsets (already held, or setting in at the window's start as from a neutral portrait), so the style is the
only input that says which expression to hold. The presets are the style encoder's vectors of the emotion
clips with their offsets.

    python training/train_motion.py --data_dir prepared --renderer checkpoints/infp-base \
        --output_dir runs/motion --config cpu
    accelerate launch --multi_gpu --num_processes 8 training/train_motion.py ... --config gpu

Fine-tune released weights with `--init_from checkpoints/infp-base` (only chosen layers with `--trainable`);
resume with `--resume_from_checkpoint latest`.
The result is a complete pipeline folder (`<output_dir>/pipeline`, or `--export_to`): the renderer of
`--renderer`, the trained motion model and style presets computed by the style encoder from the MEAD emotion
clips (`--style_clips`). Validation videos are rendered through the full pipeline into `<output_dir>/validation/`.
"""

import argparse
import copy
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_head_imitation import make_accelerator, resume, save_checkpoint  # noqa: E402

from pipeline_infp import INFPPipeline, export_for_hub  # noqa: E402
from pipeline_infp.motion_features import align  # noqa: E402
from pipeline_infp.presets import component_class, component_config, make_scheduler  # noqa: E402
from pipeline_infp.processing import FaceCrop, landmark_offsets, mouth_aperture, write_video  # noqa: E402
from prepared import PreparedClip, PreparedDataset  # noqa: E402

logger = get_logger(__name__)
MOTION_MODEL = ("motion_guider", "motion_transformer")
STYLE_PRESETS = ("neutral", "happy", "sad", "angry", "surprised")
EMOTIONS = (*STYLE_PRESETS, "contempt", "disgusted", "fear")
# Forehead, nose bridge, eye corners and temples: they align two expressions of one face without the smile or
# the brows pulling the alignment.
STABLE_POINTS = [10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 33, 133, 362, 263, 127, 356, 234, 454]


# Presets -------------------------------------------------------------------------------------------


def cpu_preset() -> dict:
    """Tens of minutes on a 2-core CPU."""
    return dict(
        motion_model="base", train_batch_size=16, max_train_steps=3000, warmup_steps=500,
        checkpointing_steps=500, validation_steps=1000,
    )  # fmt: skip


def gpu_preset() -> dict:
    """One modern GPU for a few hours (or several with accelerate)."""
    return dict(
        motion_model="base", train_batch_size=32, max_train_steps=100000, warmup_steps=5000,
        checkpointing_steps=5000, validation_steps=5000,
    )  # fmt: skip


def tiny_preset() -> dict:
    """Seconds: for tests of the script itself."""
    return dict(
        motion_model="tiny", train_batch_size=2, max_train_steps=4, warmup_steps=2, checkpointing_steps=2,
        validation_steps=4,
    )  # fmt: skip


PRESETS = {"cpu": cpu_preset, "gpu": gpu_preset, "tiny": tiny_preset}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="a dataset written by training/prepare_data.py")
    parser.add_argument("--motion_dir", help="training/prepare_motion.py's output (default: <data_dir>/motion)")
    parser.add_argument("--renderer", required=True, help="pipeline folder with the stage-1 renderer")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--config", choices=sorted(PRESETS), default="cpu", help="preset; flags below override it")
    parser.add_argument("--motion_model", choices=["tiny", "base"], help="guider and transformer size preset")
    parser.add_argument("--train_batch_size", type=int)
    parser.add_argument("--max_train_steps", type=int)
    parser.add_argument("--warmup_steps", type=int, help="one-sided windows only for this many steps")
    parser.add_argument("--checkpointing_steps", type=int)
    parser.add_argument("--validation_steps", type=int)
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", help='a checkpoint folder, or "latest"')
    parser.add_argument(
        "--init_from", help="fine-tune: start from the motion model of a pipeline folder (e.g. checkpoints/infp-base)"
    )
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument(
        "--new_layers_learning_rate",
        type=float,
        help="with --init_from: learning rate of the layers the folder lacks (default --learning_rate), so that new "
        "layers can learn fast while a low --learning_rate keeps what the trained ones know",
    )
    parser.add_argument(
        "--trainable",
        nargs="+",
        metavar="PREFIX",
        help="train only the parameters whose names start with one of these (e.g. motion_guider.verbal_ "
        "motion_guider.own_audio_proj), the rest frozen; layers --init_from's folder lacks are trained too",
    )
    parser.add_argument("--weight_decay", type=float, default=1e-2)
    parser.add_argument("--style_drop_prob", type=float, default=0.3)
    parser.add_argument("--motion_drop_prob", type=float, default=0.5)
    parser.add_argument("--prev_drop_prob", type=float, default=0.5)
    parser.add_argument("--partner_turn_prob", type=float, default=0.5, help="talking windows with partner turns")
    parser.add_argument("--overlap_prob", type=float, default=0.15, help="... of which both speak at once")
    parser.add_argument("--speaking_kinds", nargs="+", default=["talking", "dyadic-split"])
    parser.add_argument("--listening_kinds", nargs="+", default=["nonverbal"])
    parser.add_argument("--style_clips", default="dreamtalk-", help="id prefix of the MEAD emotion clips")
    parser.add_argument(
        "--expression_prob", type=float, default=0.3, help="windows moved by an emotion's expression (style data)"
    )
    parser.add_argument("--expression_ramp", type=int, default=12, help="frames over which an expression sets in")
    parser.add_argument("--dataloader_num_workers", type=int, default=1)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--report_to", default=None)
    parser.add_argument("--export_to", help="also write the final pipeline here (fp16), e.g. checkpoints/infp-base")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.config]().items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.motion_dir = args.motion_dir or str(Path(args.data_dir) / "motion")
    return args


# Data ----------------------------------------------------------------------------------------------


def mouth_activity(landmarks: np.ndarray) -> float:
    """How much the mouth moves like speech: the median frame-to-frame change of the mouth aperture."""
    aperture = mouth_aperture(np.asarray(landmarks))
    return float(np.median(np.abs(np.diff(aperture)))) if len(aperture) > 1 else 0.0


class MotionData:
    """Everything the windows are cut from: clips with latents (speaking / listening), speech tracks, silence."""

    def __init__(self, data: PreparedDataset, motion_dir: Path, speaking_kinds, listening_kinds, length: int):
        self.index = json.loads((motion_dir / "motion.json").read_text())["clips"]
        self.motion_dir = motion_dir

        def usable(clip: PreparedClip) -> bool:
            return clip.id in self.index and bool(clip.contiguous_runs(length))

        self.speaking = [c for c in data.clips(kinds=speaking_kinds, splits=["train"]) if c.has_audio and usable(c)]
        listening = [c for c in data.clips(kinds=listening_kinds, splits=["train"]) if usable(c)]
        if not self.speaking:
            raise ValueError(
                f"No train clips of kinds {speaking_kinds} with audio and motion latents in {motion_dir}: "
                "run training/prepare_motion.py first."
            )
        # A listening clip must not mouth words: keep those whose mouth moves less than most speaking clips do.
        threshold = np.quantile([mouth_activity(c.landmarks) for c in self.speaking], 0.25)
        self.listening = [c for c in listening if mouth_activity(c.landmarks) < threshold]
        self.left_out = sorted(c.id for c in listening if c not in self.listening)
        tracks = data.audio_tracks(kinds=["speech"])
        self.speech = [t for t in tracks if (motion_dir / "audio" / f"{t.id}.whisper.npy").is_file()]
        self.silence = np.load(motion_dir / "silence.whisper.npy", mmap_mode="r")

    def latents(self, clip: PreparedClip) -> np.ndarray:
        return np.load(self.motion_dir / "clips" / clip.id / "latents.npy", mmap_mode="r")

    def whisper(self, clip: PreparedClip) -> np.ndarray:
        return np.load(self.motion_dir / "clips" / clip.id / "whisper.npy", mmap_mode="r")

    def own_track(self, clip: PreparedClip, timeline: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The clip's own (Whisper features, voice activity) for timeline frames `timeline`, shifted by
        the clip's `av_offset` from prepare_motion.py (later where its sound runs late, earlier where it runs early;
        clamped to the track's ends)."""
        features = self.whisper(clip)
        audio_frames = np.clip(timeline + self.index[clip.id].get("av_offset", 0), 0, len(features) - 1)
        return np.array(features[audio_frames], dtype=np.float32), np.asarray(clip.vad, np.float32)[audio_frames]

    def speech_features(self, track) -> np.ndarray:
        return np.load(self.motion_dir / "audio" / f"{track.id}.whisper.npy", mmap_mode="r")

    def reference_mesh(self, clip: PreparedClip) -> np.ndarray:
        """The mesh the clip's latents are relative to (`prepare_motion.reference_frame`)."""
        return np.asarray(clip.landmarks[self.index[clip.id]["reference_frame"]], dtype=np.float64)


def emotion_of(clip_id: str) -> str | None:
    return next((e for e in EMOTIONS if f"-{e}-" in clip_id), None)


def expression_offsets(data: PreparedDataset, motion: MotionData, prefix: str, encoder) -> dict[str, np.ndarray]:
    """Motion-latent offsets [latent_dim] that turn each emotion clip's latents (ids `<prefix>...-<emotion>-...`)
    into latents relative to the same identity's neutral clip: the expression the clip rests in against the
    neutral clip's, on the motion encoder's geometric basis (the appearance features are not relative).
    Neutral clips get zeros; identities without a neutral clip are left out."""
    groups: dict[str, list[PreparedClip]] = {}
    for clip in data.clips():
        if clip.id in motion.index and clip.id.startswith(prefix) and emotion_of(clip.id):
            groups.setdefault(clip.identity, []).append(clip)
    offsets = {}
    for group in groups.values():
        neutral = next((c for c in group if emotion_of(c.id) == "neutral"), None)
        if neutral is None:
            continue
        reference = motion.reference_mesh(neutral)
        neutral_rest = rest_expression(neutral, reference)
        for clip in group:
            offset = landmark_offsets(rest_expression(clip, reference), neutral_rest)
            geometry = encoder.encode_landmark_offsets(torch.from_numpy(offset)[None].to(encoder.device))[0]
            latent = np.zeros(encoder.config.latent_dim, np.float32)
            latent[: len(geometry)] = geometry.float().cpu().numpy()
            offsets[clip.id] = latent
    return offsets


def rest_expression(clip: PreparedClip, reference: np.ndarray) -> np.ndarray:
    """The clip's mean mesh over its most closed-mouth quarter of frames, each frame's head pose aligned onto
    `reference` by the stable points. One frame's mesh is too noisy to tell a smile from a neutral face (the
    measured corner lift of `happy` then came out negative for one of three people); a quarter of a clip is not."""
    meshes = np.asarray(clip.landmarks, dtype=np.float64)
    aperture = mouth_aperture(meshes)
    aligned = []
    for mesh in meshes[aperture <= np.quantile(aperture, 0.25)]:
        scale, rotation, shift = align(mesh[STABLE_POINTS], reference[STABLE_POINTS])
        aligned.append(scale * mesh @ rotation.T + shift)
    return np.mean(aligned, axis=0)


class MotionWindowDataset(Dataset):
    """Random windows of `num_prev + window` frames; every index draws its own, so any sampler shards it."""

    def __init__(
        self,
        motion: MotionData,
        args,
        num_prev: int,
        window: int,
        samples_per_step: int,
        expressions: Sequence[np.ndarray] = (),
    ):
        self.motion, self.num_prev, self.window, self.args = motion, num_prev, window, args
        self.expressions = expressions
        self.samples_per_step, self.seed = samples_per_step, args.seed
        self.length = args.max_train_steps * samples_per_step
        clips = motion.speaking + motion.listening
        frames = np.array([c.num_frames for c in clips], dtype=np.float64)
        self.clips, self.weights = clips, frames / frames.sum()
        self.resumed_at = 0  # a resumed run draws new windows and knows how far training is

    def __len__(self) -> int:
        return self.length

    def silence(self, rng) -> tuple[np.ndarray, np.ndarray]:
        start = rng.integers(len(self.motion.silence) - self.window + 1)
        return np.array(self.motion.silence[start : start + self.window]), np.zeros(self.window, np.float32)

    def speech(self, rng, frames: int) -> tuple[np.ndarray, np.ndarray]:
        """`frames` consecutive frames of a random speech track (features, voice activity), looped if short."""
        track = self.motion.speech[rng.integers(len(self.motion.speech))]
        features = self.motion.speech_features(track)
        vad = track.vad[: len(features)]
        positions = (rng.integers(len(features)) + np.arange(frames)) % len(features)
        return np.array(features[positions]), vad[positions].astype(np.float32)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, self.resumed_at, index))
        warmup = self.resumed_at * self.samples_per_step + index < self.args.warmup_steps * self.samples_per_step
        clip = self.clips[rng.choice(len(self.clips), p=self.weights)]
        runs = clip.contiguous_runs(self.num_prev + self.window)
        start, stop = runs[rng.integers(len(runs))]
        first = rng.integers(start, stop - self.num_prev - self.window + 1)
        positions = np.arange(first, first + self.num_prev + self.window)
        latents = np.array(self.motion.latents(clip)[positions], dtype=np.float32)
        timeline = np.asarray(clip.indices)[positions[self.num_prev :]]

        if clip in self.motion.speaking:
            own, own_vad = self.motion.own_track(clip, timeline)
            partner, partner_vad = self.silence(rng)
            if not warmup and self.motion.speech and rng.random() < self.args.partner_turn_prob:
                overlap = rng.random() < self.args.overlap_prob
                speech = self.speech(rng, self.window)
                partner, partner_vad = place_turns(partner, partner_vad, own_vad, speech, overlap, rng)
        else:
            own, own_vad = self.silence(rng)
            if self.motion.speech:
                partner, partner_vad = self.speech(rng, self.window)
            else:
                partner, partner_vad = self.silence(rng)

        # Style: the same clip elsewhere (how this person moves), encoded by the guider's style encoder.
        style_start = rng.integers(0, clip.num_frames - self.window + 1) if clip.num_frames > self.window else 0
        style = np.array(self.motion.latents(clip)[style_start : style_start + self.window], dtype=np.float32)
        style = np.pad(style, ((0, self.window - len(style)), (0, 0)), mode="edge")
        if self.expressions and rng.random() < self.args.expression_prob:
            offset = self.expressions[rng.integers(len(self.expressions))] * rng.uniform(0.5, 1.0)
            latents += self.expression_weights(rng)[:, None] * offset
            style += offset
        return {
            "latents": torch.from_numpy(latents),
            "own": torch.from_numpy(own.astype(np.float32)),
            "partner": torch.from_numpy(partner.astype(np.float32)),
            "own_vad": torch.from_numpy(own_vad),
            "partner_vad": torch.from_numpy(partner_vad),
            "style_latents": torch.from_numpy(style),
        }

    def expression_weights(self, rng) -> np.ndarray:
        """Per frame (previous frames, then the window): how much of an expression is held. Half the windows
        continue one already held; the others start without it and it sets in smoothly, as it must when the
        first window starts from a portrait's expression."""
        weights = np.ones(self.num_prev + self.window, np.float32)
        if rng.random() < 0.5:
            ramp = np.clip(np.arange(self.window, dtype=np.float32) / max(1, self.args.expression_ramp), 0.0, 1.0)
            weights[: self.num_prev] = 0.0
            weights[self.num_prev :] = ramp * ramp * (3 - 2 * ramp)
        return weights


def place_turns(partner, partner_vad, own_vad, speech, overlap: bool, rng, min_pause: int = 8):
    """Partner speech in the own track's pauses of at least `min_pause` frames (turn taking), or over a random
    span regardless of them (`overlap`: both speak at once). Returns new (features, activity)."""
    features, vad = partner.copy(), partner_vad.copy()
    speech_features, speech_vad = speech
    length = len(own_vad)
    if overlap:
        span = rng.integers(length // 4, length + 1)
        start = rng.integers(0, length - span + 1)
        mask = np.zeros(length, bool)
        mask[start : start + span] = True
    else:
        mask = np.zeros(length, bool)
        quiet = np.concatenate([[0], (own_vad < 0.5).astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(quiet))
        for a, b in zip(edges[::2], edges[1::2]):
            if b - a >= min_pause:
                mask[a:b] = True
    features[mask], vad[mask] = speech_features[mask], speech_vad[mask]
    return features, vad


# Models --------------------------------------------------------------------------------------------


class MotionModel(nn.Module):
    """The guider and the transformer as one module, so that accelerate wraps them together."""

    def __init__(self, components: dict):
        super().__init__()
        for name, module in components.items():
            self.add_module(name, module)

    def forward(self, batch, noisy, timesteps, drop_style, drop_motion, drop_prev):
        guider = self.motion_guider
        style = guider.encode_style(batch["style_latents"])
        style = torch.where(drop_style[:, None], torch.zeros_like(style), style)
        features = guider(
            batch["own"], batch["partner"], style=style, own_activity=batch["own_vad"],
            partner_activity=batch["partner_vad"],
        ).motion_features  # fmt: skip
        num_prev = self.motion_transformer.config.num_prev_frames
        prev = self.motion_transformer.normalize_latents(batch["latents"][:, :num_prev])
        return self.motion_transformer(
            noisy, timesteps, features, prev, drop_motion_features=drop_motion, drop_prev_latents=drop_prev
        ).sample


def init_from_pipeline(model: "MotionModel", folder: str) -> list[str]:
    """Load the guider's and transformer's weights of a saved pipeline; parameters it lacks (layers added to the
    architecture since it was saved) keep their fresh initialisation. Returns their names (as in `model`)."""
    new = []
    for name in MOTION_MODEL:
        path = Path(folder) / name / "diffusion_pytorch_model.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"--init_from {folder}: no {name} weights at {path} (a stage-1 folder?).")
        module = getattr(model, name)
        state = {k: v.to(module.dtype) for k, v in load_file(path).items()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"--init_from {folder}: {name} has weights this model does not: {unexpected}")
        logger.info("Initialised %s from %s%s", name, path, f" (new: {', '.join(missing)})" if missing else "")
        new += [f"{name}.{key}" for key in missing]
    return new


def freeze_all_but(model: "MotionModel", prefixes: list[str], also: list[str]) -> list[str]:
    """Leave gradients only to the parameters named by `prefixes` (and `also`); returns the trainable names.
    A prefix that names nothing is an error listing the modules there are, since a typo would train nothing."""
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            modules = sorted({".".join(name.split(".")[:2]) for name in names})
            raise ValueError(f"--trainable {prefix}: no parameter has that prefix; there are {', '.join(modules)}")
    trainable = [name for name in names if name in also or any(name.startswith(p) for p in prefixes)]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    return trainable


def build_motion_model(args, renderer: INFPPipeline) -> dict:
    latent_dim = renderer.motion_encoder.config.latent_dim
    feature_dim = renderer.audio_encoder.feature_dim
    components = {}
    for name in MOTION_MODEL:
        config = component_config(name, args.motion_model)
        config["latent_dim"] = latent_dim
        if name == "motion_guider":
            config["audio_feature_dim"] = feature_dim
        components[name] = component_class(name)(**config)
    return components


# Validation and export -------------------------------------------------------------------------------


def assemble(renderer: INFPPipeline, model: MotionModel) -> INFPPipeline:
    """A complete pipeline: the stage-1 renderer and audio encoder with (copies of) the trained motion model."""
    parts = {name: copy.deepcopy(getattr(model, name)).float().eval() for name in MOTION_MODEL}
    others = {name: component for name, component in renderer.components.items() if name not in parts}
    return INFPPipeline(**{**others, "scheduler": make_scheduler()}, **parts)


@torch.no_grad()
def style_presets(model: MotionModel, data: PreparedDataset, motion: MotionData, offsets: dict) -> dict:
    """Named style vectors: the style encoder's mean over each emotion's clips, their latents made relative to
    the same person's neutral face (`expression_offsets`)."""
    guider = model.motion_guider
    presets = {}
    for name in STYLE_PRESETS:
        clips = [c for c in data.clips() if c.id in offsets and emotion_of(c.id) == name]
        vectors = [
            guider.encode_style(
                torch.from_numpy(np.array(motion.latents(c)) + offsets[c.id]).to(guider.device, guider.dtype)
            )
            for c in clips
        ]
        if vectors:
            presets[name] = torch.cat(vectors).mean(0).float().cpu().tolist()
    return presets


@torch.no_grad()
def validate(pipe: INFPPipeline, data: PreparedDataset, step: int, output_dir: Path, seconds: float = 8.0):
    """A video through the full pipeline: the first portrait with the two tracks of a dual-audio conversation as
    its own voice and its partner's. Returns the mp4's path (None when the data has no portrait or pair)."""
    portraits = data.portraits()
    tracks = data.audio_tracks(kinds=["dual-audio"])
    pairs = {}
    for track in tracks:
        pairs.setdefault(track.identity, []).append(track)
    pair = next((p for p in pairs.values() if len(p) >= 2), None)
    if not portraits or pair is None:
        return None
    portrait = portraits[0]
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    image = portrait.image()
    face = FaceCrop(image=image, landmarks=np.asarray(portrait.landmarks), matrix=identity, original=image)
    limit = round(seconds * 16000)
    generator = torch.Generator().manual_seed(0)
    out = pipe(face, pair[0].audio()[:limit], pair[1].audio()[:limit], generator=generator, output_type="np")
    path = output_dir / "validation" / f"step-{step:06d}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, out.frames, out.fps, out.audio)
    return path


# Training ------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    if args.report_to:
        accelerator.init_trackers("motion", config={k: v for k, v in vars(args).items() if v is not None})

    renderer = INFPPipeline.from_pretrained(args.renderer)
    renderer.set_progress_bar_config(disable=True)
    model = MotionModel(build_motion_model(args, renderer))
    new_layers = init_from_pipeline(model, args.init_from) if args.init_from else []
    if args.trainable:
        trainable = freeze_all_but(model, args.trainable, also=new_layers)
        logger.info("Training %d of %d parameter tensors", len(trainable), len(list(model.parameters())))
    transformer = model.motion_transformer
    num_prev, window = transformer.config.num_prev_frames, transformer.config.window_size

    data = PreparedDataset(args.data_dir)
    motion = MotionData(data, Path(args.motion_dir), args.speaking_kinds, args.listening_kinds, num_prev + window)
    logger.info(
        "%d speaking clips, %d listening clips (left out as mouthing words: %s), %d speech tracks",
        len(motion.speaking), len(motion.listening), ", ".join(motion.left_out) or "none", len(motion.speech),
    )  # fmt: skip
    offsets = expression_offsets(data, motion, args.style_clips, renderer.motion_encoder)
    expressions = [offset for clip_id, offset in sorted(offsets.items()) if emotion_of(clip_id) != "neutral"]
    logger.info("%d emotion expressions for style training from %s clips", len(expressions), args.style_clips)
    per_step = args.train_batch_size * accelerator.num_processes
    dataset = MotionWindowDataset(motion, args, num_prev, window, per_step, expressions)
    loader = DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=False, num_workers=args.dataloader_num_workers,
        drop_last=True,
    )  # fmt: skip

    # Latent statistics of the training clips: the transformer works on normalised latents.
    every = np.concatenate([np.asarray(motion.latents(c)) for c in motion.speaking + motion.listening])
    transformer.latent_mean.copy_(torch.from_numpy(every.mean(0)))
    transformer.latent_std.copy_(torch.from_numpy(every.std(0)).clamp_min(1e-4))

    scheduler = make_scheduler()  # the motion model's own schedule, whatever the renderer folder holds
    predicts_sample = scheduler.config.prediction_type == "sample"
    new_rate = args.learning_rate if args.new_layers_learning_rate is None else args.new_layers_learning_rate
    groups = [
        {"params": [p for n, p in model.named_parameters() if n not in new_layers], "lr": args.learning_rate},
        {"params": [p for n, p in model.named_parameters() if n in new_layers], "lr": new_rate},
    ]
    groups = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in groups]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=args.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    global_step = resume(accelerator, args.resume_from_checkpoint, output_dir)
    dataset.resumed_at = global_step  # new random draws, and the dataset knows how far training is

    progress = tqdm(range(args.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process)
    start, first_step = time.perf_counter(), global_step
    alphas = scheduler.alphas_cumprod.to(accelerator.device)
    data_iter = iter(loader)
    while global_step < args.max_train_steps:
        batch = next(data_iter)
        unwrapped = accelerator.unwrap_model(model)
        target = unwrapped.motion_transformer.normalize_latents(batch["latents"][:, num_prev:])
        size = target.shape[0]
        noise = torch.randn_like(target)
        timesteps = torch.randint(0, len(alphas), (size,), device=target.device)
        alpha = alphas[timesteps].view(-1, 1, 1)
        noisy = alpha.sqrt() * target + (1 - alpha).sqrt() * noise
        drops = [
            torch.rand(size, device=target.device) < p
            for p in (args.style_drop_prob, args.motion_drop_prob, args.prev_drop_prob)
        ]
        with accelerator.autocast():
            prediction = model(batch, noisy, timesteps, *drops)
            loss = F.mse_loss(prediction.float(), target if predicts_sample else noise)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        global_step += 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        accelerator.log({"loss": loss.item()}, step=global_step)

        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if accelerator.is_main_process:
                export(accelerator.unwrap_model(model), renderer, data, motion, offsets, output_dir / "pipeline")
        validation_due = global_step % args.validation_steps == 0 or global_step == args.max_train_steps
        if accelerator.is_main_process and validation_due:
            path = validate(assemble(renderer, accelerator.unwrap_model(model)), data, global_step, output_dir)
            elapsed = time.perf_counter() - start
            logger.info("step %d: loss %.4f, validation video %s (%.0f s)", global_step, loss.item(), path, elapsed)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.export_to:
            export(accelerator.unwrap_model(model), renderer, data, motion, offsets, Path(args.export_to))
        elapsed = time.perf_counter() - start
        windows = (global_step - first_step) * per_step / max(1e-9, elapsed)
        logger.info("Done: %d steps in %.1f min (%.1f windows/s)", global_step, elapsed / 60, windows)
    accelerator.end_training()


def export(model: MotionModel, renderer: INFPPipeline, data, motion, offsets: dict, folder: Path) -> None:
    """The complete pipeline as an fp16 Hub folder, with the style presets in the guider's config."""
    pipe = copy.deepcopy(assemble(renderer, model))  # the export casts to fp16: not the renderer in use
    pipe.motion_guider.register_to_config(style_presets=style_presets(model, data, motion, offsets))
    export_pipeline(pipe, folder)


def export_pipeline(pipe: INFPPipeline, folder: Path) -> None:
    """`pipe` as an fp16 Hub folder, replacing whatever `folder` held (`pipe` is cast to fp16)."""
    if folder.exists():
        shutil.rmtree(folder)
    # Whisper-base weights are rebuilt on load; any other audio encoder (the tests' tiny one) travels with its weights.
    whisper = component_config("audio_encoder", "base")
    is_whisper = all(pipe.audio_encoder.config.get(key) == value for key, value in whisper.items())
    export_for_hub(pipe, folder, include_audio_encoder_weights=not is_whisper, torch_dtype=torch.float16)


if __name__ == "__main__":
    main()
