"""INFPPipeline: one portrait + the agent's own voice + the partner's voice → a talking/listening head video.

Inference follows INFP (CVPR 2025) top to bottom:
  1. prepare inputs: crop the portrait around its face, load and align the two audio tracks;
  2. encode audio: frozen Whisper-base features at the video frame rate, per track;
  3. guide: the interactive motion guider turns both tracks (and an optional style) into f_m;
  4. denoise window by window: the motion transformer generates motion latents with DDIM and
     classifier-free guidance, each window conditioned on the last frames of the previous one;
  5. render: the face renderer animates the portrait with the generated motion latents;
  6. output: frames (optionally pasted back into the full portrait) with the mixed audio.

This file is also copied to the root of exported Hub folders and imported on its own by
diffusers' `trust_remote_code` loader, so it uses absolute imports only.
"""

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import snapshot_download

from pipeline_infp import models
from pipeline_infp.hub import make_self_contained
from pipeline_infp.processing import (
    CLOSED_MOUTH_APERTURE,
    OPEN_MOUTH_APERTURE,
    SAMPLE_RATE,
    FaceCrop,
    FaceProcessor,
    NoFaceDetectedError,
    SilentAudioError,
    apply_landmark_offsets,
    check_duration,
    hybrid_representation,
    is_silent,
    landmark_offsets,
    load_audio,
    mix_tracks,
    mouth_aperture,
    mouth_closing_motion,
    moved_region,
    pad_to_same_length,
    prior_flow,
    read_video,
    silence_weights,
    voice_activity,
    warp_lock,
)
from pipeline_infp.processing import paste_back as paste_back_frames

# Lips drawn at rest this far apart (inner-lip gap, inter-ocular distances) or more are closed in the image: a little
# under `OPEN_MOUTH_APERTURE`, since the least motion while listening opens them further (a grin drawn at 0.046 read
# 0.056 on average over its listening frames).
DRAWN_CLOSED_APERTURE = 0.045
# The drawn gap is read at rest and moved by ± one spread along each of this many principal motions, and the median
# decides: a single reading moves by ~0.01 between renderers of about the same quality and across small motions (the
# grin: 0.051 at rest from one renderer, 0.038 from a fine-tune of it; the median 0.051 and 0.050), so one reading
# near the threshold decided by chance whether a face listened closed.
REST_PROBE_COMPONENTS = 4


@dataclass
class INFPPipelineOutput(BaseOutput):
    """
    frames: the video, as a list of PIL images, a float array [T, H, W, 3] in [0, 1] ("np"), a tensor
        [T, 3, H, W] in [0, 1] ("pt"), or None for output_type="latent".
    motion_latents: generated motion latents [T, latent_dim], in the motion encoder's space, relative to the face
        at rest (`render` adds the portrait's `rest` motion when `close_mouth` closed its lips).
    fps: frames per second of `frames`.
    audio: the own and partner tracks mixed, mono float32 at 16 kHz, as long as the video.
    """

    frames: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None
    motion_latents: torch.Tensor
    fps: float
    audio: np.ndarray


# Classifier-free guidance on the audio-derived motion features: chosen with `evaluate motion` on the shared data
# (model card), where more guidance sharpens lip sync little but opens the mouth while listening and less makes
# the motion too uniform.
DEFAULT_GUIDANCE_SCALE = 2.0
# Lips held at rest wherever the agent's own track is silent (`rest_mouth`): the motion model alone keeps them parted
# in a third of the frames where only the partner speaks.
DEFAULT_SILENT_MOUTH_REST = 1.0

COMPONENT_CLASSES = {
    "audio_encoder": "AudioEncoder",
    "motion_guider": "MotionGuider",
    "motion_transformer": "MotionTransformer",
    "motion_encoder": "MotionEncoder",
    "appearance_encoder": "AppearanceEncoder",
    "flow_estimator": "FlowEstimator",
    "face_decoder": "FaceDecoder",
}


@dataclass
class INFPStreamOutput(BaseOutput):
    """One window of `INFPPipeline.stream`: frames [n, S, S, 3] float in [0, 1], their motion latents
    [n, latent_dim] and the two tracks mixed for those frames (16 kHz mono)."""

    frames: np.ndarray
    motion_latents: torch.Tensor
    audio: np.ndarray


class _NoProgress:
    """A progress bar that shows nothing: streamed windows report themselves by being yielded."""

    def update(self, n: int = 1) -> None:
        pass


@dataclass
class PortraitEncoding:
    """latent: the portrait's motion latent [1, latent_dim]; features: its appearance feature volume;
    image: the crop itself [1, 3, S, S] in [-1, 1], which the decoder warps at full resolution;
    landmarks: its face mesh [478, 3] in crop pixels, which generated motion moves;
    rest: a motion latent [1, latent_dim] added to every rendered frame's, or None (see `encode_portrait`);
    person_mask: the crop's person mask [S, S] when the flow estimator's prior uses it, else None."""

    latent: torch.Tensor
    features: torch.Tensor
    image: torch.Tensor
    landmarks: np.ndarray
    rest: torch.Tensor | None = None
    person_mask: np.ndarray | None = None


def _per_mesh(compute, meshes: np.ndarray, pool: Executor | None) -> torch.Tensor:
    """`compute` of each of `meshes`, stacked into a CPU tensor; frames in parallel on `pool`'s threads when given."""
    return torch.from_numpy(np.stack(list(pool.map(compute, meshes)) if pool else [compute(m) for m in meshes]))


def crossfade(tail: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """`window` [B, W, D] with its first frames faded in from `tail` [B, O, D], the previous window's latents for
    the same frames. Each window alone continues its condition frames smoothly, yet the two disagree a little
    where they meet: joined end to end, the first frame of each window jumped 1.5x as far as frames inside windows
    (val clips, bundled weights); spread over the shared frames the step is no larger than any other."""
    overlap = tail.shape[1]
    weight = torch.arange(1, overlap + 1, device=window.device, dtype=window.dtype).view(1, -1, 1) / (overlap + 1)
    return torch.cat([(1 - weight) * tail + weight * window[:, :overlap], window[:, overlap:]], dim=1)


def check_silent_mouth_rest(strength) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(
            f"silent_mouth_rest must be a number from 0 (lips as generated) to 1 (lips at rest while the agent is "
            f"silent), got {strength!r}."
        )


def image_to_tensor(images: np.ndarray, device, dtype) -> torch.Tensor:
    """uint8 [B, H, W, 3] → [B, 3, H, W] in [-1, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return (tensor.to(device=device, dtype=torch.float32) / 127.5 - 1).to(dtype)


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Rendered frames [T, 3, H, W] in [0, 1] → uint8 [T, H, W, 3] (C order: OpenCV and MediaPipe read them)."""
    return np.ascontiguousarray((frames.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8))


class INFPPipeline(DiffusionPipeline):
    model_cpu_offload_seq = (
        "audio_encoder->motion_guider->motion_transformer->motion_encoder->appearance_encoder->flow_estimator"
        "->face_decoder"
    )
    _callback_tensor_inputs = ["latents", "model_output"]
    # A stage-1 checkpoint (face renderer only) has no motion model yet; it can still reenact faces.
    _optional_components = ["motion_guider", "motion_transformer"]

    def __init__(
        self,
        audio_encoder: ModelMixin,
        motion_guider: ModelMixin | None,
        motion_transformer: ModelMixin | None,
        scheduler: DDIMScheduler,
        motion_encoder: ModelMixin,
        appearance_encoder: ModelMixin,
        flow_estimator: ModelMixin,
        face_decoder: ModelMixin,
    ):
        super().__init__()
        self.register_modules(
            audio_encoder=audio_encoder,
            motion_guider=motion_guider,
            motion_transformer=motion_transformer,
            scheduler=scheduler,
            motion_encoder=motion_encoder,
            appearance_encoder=appearance_encoder,
            flow_estimator=flow_estimator,
            face_decoder=face_decoder,
        )
        self._face_processor = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load a saved or exported folder (or Hub repo id) with this package's own classes.

        Saved folders also carry a copy of the code for `DiffusionPipeline.from_pretrained(...,
        trust_remote_code=True)`; here those copies are never executed (diffusers would run the folder's
        pipeline file whenever one is present, so the components are loaded one by one instead).
        Components passed as keyword arguments are used as they are. Supported options: `torch_dtype`,
        `variant`, `use_safetensors`, `low_cpu_mem_usage` and, for Hub repos, `revision`, `token`, `cache_dir`,
        `local_files_only`. `low_cpu_mem_usage` defaults to False here: weights a folder lacks (layers added since
        it was saved, zero-initialised where that keeps the old outputs) are initialised instead of being left
        unallocated on the meta device, where the first call would fail.
        """
        if kwargs.pop("trust_remote_code", False):
            return DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, trust_remote_code=True, **kwargs)
        components = {name: kwargs.pop(name) for name in [*COMPONENT_CLASSES, "scheduler"] if name in kwargs}
        load_options = ("torch_dtype", "variant", "use_safetensors", "low_cpu_mem_usage")
        load_kwargs = {"low_cpu_mem_usage": False} | {key: kwargs.pop(key) for key in load_options if key in kwargs}
        download_kwargs = {
            key: kwargs.pop(key) for key in ("revision", "token", "cache_dir", "local_files_only") if key in kwargs
        }
        if kwargs:
            raise TypeError(f"Unsupported from_pretrained options: {', '.join(sorted(kwargs))}.")
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            path = snapshot_download(path, **download_kwargs)
        for name, class_name in COMPONENT_CLASSES.items():
            if name in components:
                continue
            if name in cls._optional_components and not os.path.isdir(os.path.join(path, name)):
                components[name] = None
            else:
                components[name] = getattr(models, class_name).from_pretrained(path, subfolder=name, **load_kwargs)
        if "scheduler" not in components:
            components["scheduler"] = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
        pipe = cls(**components)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        return pipe

    def save_pretrained(self, save_directory, **kwargs):
        """Save in Hub layout, self-contained: weights, configs and a copy of the code (see `pipeline_infp.hub`)."""
        super().save_pretrained(save_directory, **kwargs)
        make_self_contained(self, save_directory)

    @property
    def fps(self) -> float:
        return float(self.audio_encoder.config.fps)

    @property
    def face_processor(self) -> FaceProcessor:
        if self._face_processor is None:
            self._face_processor = FaceProcessor()
        return self._face_processor

    # 1. Inputs -----------------------------------------------------------------------------------

    def prepare_portrait(self, portrait, image_size: int) -> FaceCrop:
        if isinstance(portrait, FaceCrop):
            return portrait
        return self.face_processor.crop_portrait(portrait, size=image_size)

    def prepare_audio(self, audio_self, audio_other, max_duration: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Both tracks as 16 kHz mono of equal length; a missing partner track is silence."""
        own = load_audio(audio_self, name="own voice")
        partner = np.zeros_like(own) if audio_other is None else load_audio(audio_other, name="partner voice")
        if max_duration is not None:
            check_duration(own, max_duration, name="own voice")
            check_duration(partner, max_duration, name="partner voice")
        if is_silent(own) and is_silent(partner):
            raise SilentAudioError(
                "Both audio tracks are silent: the head would have nothing to say or react to. "
                "Give the agent's own voice and/or the partner's voice with audible speech."
            )
        own, partner = pad_to_same_length(own, partner)
        return own, partner

    def resolve_window_overlap(self, window_overlap: int | None) -> int:
        """The number of frames each window shares with the one before (see `crossfade`). None: a fifth of the
        window (10 of 50 frames for the base model: a quarter more motion generation, and the seams go from 1.5x
        to 0.9x the frame-to-frame motion inside windows). It must leave the next window's `num_prev_frames`
        condition inside the window that is finished."""
        config = self.motion_transformer.config
        largest = config.window_size - config.num_prev_frames
        if window_overlap is None:
            return min(config.window_size // 5, largest)
        if not isinstance(window_overlap, int) or not 0 <= window_overlap <= largest:
            raise ValueError(
                f"window_overlap must be a whole number of frames from 0 to {largest} (window_size "
                f"{config.window_size} - num_prev_frames {config.num_prev_frames}), got {window_overlap!r}."
            )
        return window_overlap

    def num_windows(self, num_frames: int, window_overlap: int | None = None) -> int:
        """How many motion windows cover `num_frames` video frames."""
        window = self.motion_transformer.config.window_size
        stride = window - self.resolve_window_overlap(window_overlap)
        return 1 + -(-max(0, num_frames - window) // stride)

    def pad_to_windows(
        self, own: np.ndarray, partner: np.ndarray, window_overlap: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Both tracks padded with silence to whole motion windows that start every `window_size -
        window_overlap` frames: (own, partner, video frames, padded frames)."""
        window = self.motion_transformer.config.window_size
        stride = window - self.resolve_window_overlap(window_overlap)
        num_frames = max(1, round(len(own) / SAMPLE_RATE * self.fps))
        padded_frames = window + (self.num_windows(num_frames, window_overlap) - 1) * stride
        padded_samples = round(padded_frames / self.fps * SAMPLE_RATE)
        own, partner = (np.pad(x, (0, max(0, padded_samples - len(x)))) for x in (own, partner))
        return own, partner, num_frames, padded_frames

    @torch.no_grad()
    def encode_portrait(self, face: FaceCrop, close_mouth: bool = False) -> PortraitEncoding:
        """Everything the renderer needs from the portrait, computed once per video.

        Generated motion is relative to a face at rest with closed lips (every training clip's reference frame).
        With `close_mouth`, a portrait with parted lips is first brought to rest: its lips are closed in the image
        (`close_portrait_mouth`), and whatever gap is left by the most ordinary motion that closes it
        (`mouth_closing_motion`), which becomes `rest`, added to every frame the renderer draws; so the face listens
        with a closed mouth and talks from there. Off for reenactment, where the driving motion is relative to the
        portrait itself."""
        if close_mouth:
            face = self.close_portrait_mouth(face)
        device, dtype = self._execution_device, self.appearance_encoder.dtype
        image = image_to_tensor(face.image[None], device, dtype)
        latent = self.encode_motion(face.image[None], face.landmarks[None])
        landmarks = np.asarray(face.landmarks, dtype=np.float32)
        person_prior = self.flow_estimator.config.person_prior
        return PortraitEncoding(
            latent=latent, features=self.appearance_encoder(image), image=image, landmarks=landmarks,
            rest=self.rest_motion(landmarks).to(latent) if close_mouth else None,
            person_mask=self.face_processor.person_mask(face.image) if person_prior else None,
        )  # fmt: skip

    def geometry_basis(self) -> np.ndarray:
        """Landmark offsets (inter-ocular distances) per unit of each geometric latent value [K, 478 * 3]: the
        motion encoder's principal motions scaled to their spread, so least-norm coefficients over it are the most
        ordinary motions (`mouth_closing_motion`)."""
        encoder = self.motion_encoder
        return (encoder.landmark_basis.double() * encoder.landmark_scale.double()[:, None]).cpu().numpy()

    def rest_motion(self, landmarks: np.ndarray) -> torch.Tensor:
        """The motion latent [1, latent_dim] that brings a face mesh [478, 3] with parted lips to rest: the most
        ordinary mesh motion that closes them (`mouth_closing_motion`; zero for closed lips), no appearance change."""
        basis = self.geometry_basis()
        rest = torch.zeros(1, self.motion_encoder.config.latent_dim)
        rest[0, : len(basis)] = torch.from_numpy(mouth_closing_motion(landmarks, basis))
        return rest

    def rest_probes(self, encoding: PortraitEncoding) -> torch.Tensor:
        """Motion latents [1 + 2K, latent_dim]: the portrait at rest as animated (its own latent), then moved by +1
        and -1 spread along each of the motion encoder's first K principal motions (`REST_PROBE_COMPONENTS`)."""
        count = min(REST_PROBE_COMPONENTS, self.motion_encoder.config.landmark_components)
        probes = encoding.latent.repeat(1 + 2 * count, 1)
        components = torch.arange(count)
        probes[1 + 2 * components, components] += 1
        probes[2 + 2 * components, components] -= 1
        return probes

    @torch.no_grad()
    def drawn_rest_aperture(self, encoding: PortraitEncoding) -> float | None:
        """The inner-lip gap MediaPipe reads on the portrait drawn at rest and under the `rest_probes`, without the
        warp lock: the median over the drawings where it finds a face; None where it finds none."""
        drawings = frames_to_uint8(self.render(encoding, self.rest_probes(encoding), warp_lock=False))
        _, meshes, _ = self.face_processor.track_landmarks(drawings)
        return float(np.median(mouth_aperture(np.stack(meshes)))) if meshes else None

    @torch.no_grad()
    def close_portrait_mouth(self, face: FaceCrop, max_passes: int = 3) -> FaceCrop:
        """The portrait, with its lips closed in the image itself where the renderer cannot close them from it.

        `rest` closes the mesh of any parted lips, and from lips a little apart the renderer draws them closed. From
        a wide-open mouth (a shout, an "O", a grin) it cannot: there MediaPipe puts the inner-lip line inside the
        mouth, so the warp carries interior into the lips (a shout's inner-lip gap 0.47 → 0.19 rendered at rest,
        bundled renderer). So when the portrait drawn at rest as it will be animated (from its own latent: no motion,
        its own appearance values; the median over it and small motions, `drawn_rest_aperture`) still shows its lips
        apart (`DRAWN_CLOSED_APERTURE`), passes close the image:
        each renders it at rest, keeps that only where the closing moves the face (`moved_region`), the rest of the
        portrait as it was, and meshes it again, until its own lips meet (the shout: 0.47 → 0.01 in three passes).
        Stops after `max_passes`, or when no face is found in a pass's image or in any drawing the check reads. A
        portrait the renderer closes by itself is returned as it is: every pass blurs the image a little."""
        # The passes draw from the zero latent, whose appearance values no training sample has (the encoder's sit ~81
        # from zero and vary by ~0.15): from it the renderer draws lips meeting (passes from the portrait's own values
        # lowered the listening mouth, e.g. the bundled renderer's 95.6 → 86.3 %, seed 0). The check is drawn as
        # animated: a renderer may draw the zero latent worse (the fine-tune in the bundled one: whole face changed,
        # lips apart), and passes on portraits it animates closed distort them (`evaluate motion` FD 8.68 with the
        # check drawn from the zero latent, 8.42 with this one).
        zero = torch.zeros(1, self.motion_encoder.config.latent_dim)
        for index in range(max_passes):
            if mouth_aperture(face.landmarks) < OPEN_MOUTH_APERTURE:
                break
            encoding = self.encode_portrait(face)
            encoding.rest = self.rest_motion(encoding.landmarks).to(encoding.latent)
            try:
                if index == 0:
                    drawn = self.drawn_rest_aperture(encoding)
                    if drawn is None or drawn < DRAWN_CLOSED_APERTURE:
                        break  # the renderer draws these lips closed by itself (or no face at all)
                # Without the lock: it keeps the warped portrait's lips, and the warp of a wide-open mouth carries the
                # mouth's interior into them; the decoder learnt to draw lips meeting (the shout: 0.47 → 0.035
                # locked, 0.010 not, in three passes).
                rendered = frames_to_uint8(self.render(encoding, zero.to(encoding.latent), warp_lock=False))[0]
                rest_mesh = self.motion_landmarks(encoding.landmarks, encoding.rest)[0]
                weight = moved_region(encoding.landmarks, rest_mesh, face.image.shape[0])[..., None]
                image = np.ascontiguousarray((weight * rendered + (1 - weight) * face.image).round().astype(np.uint8))
                face = replace(face, image=image, landmarks=self.face_processor.landmarks(image).astype(np.float32))
            except NoFaceDetectedError:
                break
        return face

    @torch.no_grad()
    def encode_motion(
        self, crops: np.ndarray, landmarks: np.ndarray, reference_landmarks: np.ndarray | None = None
    ) -> torch.Tensor:
        """Motion latents [T, latent_dim] of face crops (uint8 [T, S, S, 3]) with their mesh landmarks [T, 478, 3]:
        the mesh's motion relative to `reference_landmarks` (a frame of the same face with a neutral, closed-mouth
        expression at best; default: the first frame) and INFP's hybrid representation (eyes and lips kept,
        face outline drawn). Crops of one sequence must share one crop frame for the motion to include the head's."""
        reference = landmarks[0] if reference_landmarks is None else reference_landmarks
        hybrids = np.stack([hybrid_representation(c, lm) for c, lm in zip(crops, landmarks)])
        device, dtype = self._execution_device, self.motion_encoder.dtype
        offsets = torch.from_numpy(landmark_offsets(landmarks, reference)).to(device)
        return self.motion_encoder(image_to_tensor(hybrids, device, dtype), offsets)

    @torch.no_grad()
    def encode_reference_motion(self, frames: np.ndarray, image_size: int) -> torch.Tensor:
        """Motion latents [L, latent_dim] of a reference clip's frames (uint8 [T, H, W, 3])."""
        track = self.face_processor.track_video(frames, size=image_size)
        return self.encode_motion(track.crops, track.landmarks)

    def prepare_style(self, style, image_size: int) -> torch.Tensor | None:
        """None, a preset name, a style vector [style_dim], reference motion latents [L, latent_dim],
        or a reference clip (video path or uint8 frames [T, H, W, 3]) → style vector or None."""
        if style is None:
            return None
        guider = self.motion_guider
        if isinstance(style, str) and not Path(style).suffix:
            return guider.style_preset(style)
        if isinstance(style, torch.Tensor) and style.ndim == 1:
            if style.shape[0] != guider.config.style_dim:
                raise ValueError(f"A style vector must have {guider.config.style_dim} values, got {style.shape[0]}.")
            return style.to(self._execution_device, guider.dtype)
        if isinstance(style, torch.Tensor) and style.ndim == 2:
            motion = style
        else:
            frames = read_video(style)[0] if isinstance(style, (str, Path)) else np.asarray(style)
            motion = self.encode_reference_motion(frames, image_size)
        with torch.no_grad():
            return guider.encode_style(motion.to(self._execution_device, guider.dtype))[0]

    # 2. Audio ------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_audio(self, own: np.ndarray, partner: np.ndarray, num_frames: int) -> torch.Tensor:
        """Whisper features [2, num_frames, feature_dim] for (own, partner)."""
        waveforms = torch.from_numpy(np.stack([own, partner])).to(self._execution_device, self.audio_encoder.dtype)
        return self.audio_encoder(waveforms, num_frames=num_frames)

    def motion_features_for(
        self, own: np.ndarray, partner: np.ndarray, num_frames: int, style_vector
    ) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """Steps 2-3 for tracks covering `num_frames` frames: Whisper features and voice activity of both tracks,
        then the guider's f_m with the style and without it (None without a style), in the transformer's dtype,
        and the voice activity [2, num_frames] (own, partner)."""
        audio_features = self.encode_audio(own, partner, num_frames)
        activity = np.stack([voice_activity(x, num_frames, fps=self.fps) for x in (own, partner)])
        styled, plain = self.guide(audio_features, torch.from_numpy(activity).to(self._execution_device), style_vector)
        dtype = self.motion_transformer.dtype
        return styled.to(dtype), None if plain is None else plain.to(dtype), activity

    # 3. Guide ------------------------------------------------------------------------------------

    @torch.no_grad()
    def guide(self, audio_features, activity, style) -> tuple[torch.Tensor, torch.Tensor | None]:
        """f_m [1, T, D] with the style, and without it (None when there is no style)."""
        guider = self.motion_guider
        own, partner = audio_features.to(guider.dtype).chunk(2)
        kwargs = dict(own_activity=activity[:1], partner_activity=activity[1:])
        styled = guider(own, partner, style=style, **kwargs).motion_features
        plain = guider(own, partner, style=None, **kwargs).motion_features if style is not None else None
        return styled, plain

    # 3b. The agent's silences ---------------------------------------------------------------------

    def silent_mouth_weights(self, own_activity: np.ndarray, strength: float) -> np.ndarray | None:
        """How firmly each frame's lips are held at rest [T]: `strength` deep in the agent's own silences, easing to
        0 where its voice is active (`silence_weights`); None for strength 0 (the motion as generated)."""
        return None if strength == 0 else strength * silence_weights(own_activity)

    @torch.no_grad()
    def rest_mouth(self, portrait: PortraitEncoding, latents: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
        """Normalised motion latents [1, W, latent_dim] with each frame's lips moved towards rest by its weight [W]
        (1: the inner-lip gap of the face at rest, 0: unchanged), by the most ordinary mesh motion that does it
        (`mouth_closing_motion`); the appearance part is left to the denoiser, which follows the geometry.

        The motion model learnt listening from footage whose mouths hang open about half the time while not
        speaking (model card), so on its own it keeps the lips parted in a third of the frames where only the
        partner speaks; applied to the clean-latent estimate at every denoising step this brings them to rest."""
        transformer, basis = self.motion_transformer, self.geometry_basis()
        motion = transformer.denormalize_latents(latents.float())[0].cpu()
        rest = torch.zeros_like(motion[:1]) if portrait.rest is None else portrait.rest.float().cpu()
        target = max(CLOSED_MOUTH_APERTURE, float(mouth_aperture(self.motion_landmarks(portrait.landmarks, rest)[0])))
        closed = motion.clone()
        # Linear in the mesh, not quite in the latents (geometry clamped to ±MAX_GEOMETRY, the eyes move too):
        # on random motion the third step is within 1e-4 inter-ocular distances of the target.
        for _ in range(3):
            meshes = self.motion_landmarks(portrait.landmarks, closed + rest)
            closed[:, : len(basis)] += torch.from_numpy(mouth_closing_motion(meshes, basis, target)).to(closed)
        weights = torch.as_tensor(np.asarray(weights), dtype=motion.dtype)[:, None]
        motion = motion + weights * (closed - motion)
        return transformer.normalize_latents(motion.to(latents.device))[None].to(latents.dtype)

    def with_rested_mouth(
        self, portrait: PortraitEncoding, model_output: torch.Tensor, latents: torch.Tensor, t, weights: np.ndarray
    ) -> torch.Tensor:
        """The transformer's output with its clean-latent estimate passed through `rest_mouth`, in the form the
        scheduler's prediction_type expects (clean latents, noise or v)."""
        prediction_type = self.scheduler.config.prediction_type
        alpha = self.scheduler.alphas_cumprod[int(t)].to(latents.device, torch.float32)
        signal, noise = alpha.sqrt(), (1 - alpha).sqrt()
        if prediction_type == "sample":
            clean = model_output
        elif prediction_type == "epsilon":
            clean = (latents - noise * model_output) / signal
        elif prediction_type == "v_prediction":
            clean = signal * latents - noise * model_output
        else:
            raise ValueError(f"Unsupported scheduler prediction_type {prediction_type!r}.")
        change = self.rest_mouth(portrait, clean, weights) - clean
        if prediction_type == "sample":
            return model_output + change
        if prediction_type == "epsilon":
            return (model_output - change * signal / noise).to(model_output.dtype)
        return (model_output - change / noise).to(model_output.dtype)

    # 4. Denoise ----------------------------------------------------------------------------------

    def initial_prev_latents(self, portrait: PortraitEncoding) -> torch.Tensor:
        """The first window's condition: the portrait's own motion latent as all `num_prev_frames` previous frames
        (normalised), so the video starts from the portrait's expression."""
        transformer = self.motion_transformer
        latent = transformer.normalize_latents(portrait.latent.to(transformer.dtype))
        return latent.unsqueeze(1).expand(-1, transformer.config.num_prev_frames, -1)

    def denoise_windows(
        self,
        portrait: PortraitEncoding,
        motion_features: torch.Tensor,
        plain_motion_features: torch.Tensor | None,
        num_inference_steps: int,
        guidance_scale: float,
        style_guidance_scale: float,
        generator,
        eta: float,
        window_overlap: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        mouth_rest_weights: np.ndarray | None = None,
    ) -> torch.Tensor:
        """Every window of f_m [1, T, D] in turn (T as `pad_to_windows` gives it), each starting `window_size -
        window_overlap` frames after the one before, continuing from the `num_prev_frames` frames before its start
        and cross-faded over the shared frames: motion latents [T, latent_dim] in the motion encoder's space.
        `mouth_rest_weights` [T] (`silent_mouth_weights`): how firmly each frame's lips are held at rest."""
        transformer = self.motion_transformer
        window, num_prev = transformer.config.window_size, transformer.config.num_prev_frames
        stride = window - self.resolve_window_overlap(window_overlap)
        num_windows = 1 + (motion_features.shape[1] - window) // stride
        prev = self.initial_prev_latents(portrait)
        joined = None
        with self.progress_bar(total=num_windows * num_inference_steps) as progress_bar:
            for w in range(num_windows):
                span = slice(w * stride, w * stride + window)
                latents = self.denoise_window(
                    motion_features[:, span],
                    None if plain_motion_features is None else plain_motion_features[:, span],
                    prev, num_inference_steps, guidance_scale, style_guidance_scale, generator, eta, w,
                    callback_on_step_end, callback_on_step_end_tensor_inputs, progress_bar, portrait,
                    None if mouth_rest_weights is None else mouth_rest_weights[span],
                )  # fmt: skip
                if joined is None:
                    joined = latents
                else:
                    joined = torch.cat([joined[:, : span.start], crossfade(joined[:, span.start :], latents)], dim=1)
                prev = joined[:, span.start + stride - num_prev : span.start + stride]
        return transformer.denormalize_latents(joined)[0]

    def denoise_window(
        self,
        motion_features: torch.Tensor,
        plain_motion_features: torch.Tensor | None,
        prev_latents: torch.Tensor,
        num_inference_steps: int,
        guidance_scale: float,
        style_guidance_scale: float,
        generator,
        eta: float,
        window_index: int,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: list[str],
        progress_bar,
        portrait: PortraitEncoding | None = None,
        mouth_rest_weights: np.ndarray | None = None,
    ) -> torch.Tensor:
        """One window of normalised motion latents [1, W, latent_dim].

        Classifier-free guidance with separate audio and style scales, all branches in one batch:
            out = out_a + (g_a - 1)(out_a - out_uncond) + g_s (out_styled - out_a)
        where `out` is the transformer's prediction (clean latents or noise, as the scheduler's prediction_type
        says), out_a uses f_m without style and out_uncond drops f_m. The previous-window latents are kept in
        every branch so guidance never pushes the motion away from continuity. With `mouth_rest_weights` [W], the
        guided prediction's lips are brought towards rest on the agent's silent frames at every step (`rest_mouth`,
        which needs the `portrait`), so the remaining steps denoise around resting lips.
        """
        transformer = self.motion_transformer
        length = motion_features.shape[1]
        latents = randn_tensor(
            (1, length, transformer.config.latent_dim), generator=generator, device=self._execution_device,
            dtype=transformer.dtype,
        )  # fmt: skip
        self.scheduler.set_timesteps(num_inference_steps, device=self._execution_device)
        latents = latents * self.scheduler.init_noise_sigma

        styled = plain_motion_features is not None
        branches = [plain_motion_features if styled else motion_features]
        if styled:
            branches.append(motion_features)
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            branches.append(motion_features)  # content ignored: dropped below
        features = torch.cat(branches)
        drop = torch.zeros(len(branches), dtype=torch.bool, device=features.device)
        drop[-1] = use_cfg
        prev = prev_latents.expand(len(branches), -1, -1)

        for i, t in enumerate(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(latents, t).expand(len(branches), -1, -1)
            outputs = transformer(model_input, t, features, prev, drop_motion_features=drop).sample
            model_output = outputs[:1]
            if use_cfg:
                model_output = model_output + (guidance_scale - 1.0) * (outputs[:1] - outputs[-1:])
            if styled:
                model_output = model_output + style_guidance_scale * (outputs[1:2] - outputs[:1])
            if mouth_rest_weights is not None:
                model_output = self.with_rested_mouth(portrait, model_output, latents, t, mouth_rest_weights)
            latents = self.scheduler.step(model_output, t, latents, eta=eta, generator=generator).prev_sample
            if callback_on_step_end is not None:
                local = {"latents": latents, "model_output": model_output}
                outputs = callback_on_step_end(
                    self, window_index * num_inference_steps + i, t,
                    {k: local[k] for k in callback_on_step_end_tensor_inputs},
                )  # fmt: skip
                latents = outputs.pop("latents", latents)
            progress_bar.update()
        return latents

    # 5. Render -----------------------------------------------------------------------------------

    def motion_landmarks(self, landmarks: np.ndarray, motion_latents: torch.Tensor) -> np.ndarray:
        """The meshes [T, 478, 3] that motion latents [T, latent_dim] move a face's mesh `landmarks` [478, 3] to."""
        offsets = self.motion_encoder.decode_landmark_offsets(motion_latents).float().cpu().numpy()
        return apply_landmark_offsets(landmarks, offsets)

    def prior_flows(
        self, portrait: PortraitEncoding, meshes: np.ndarray, pool: Executor | None = None
    ) -> torch.Tensor:
        """The geometric prior flows [T, 2, s, s] (s: the renderer's working size, on the CPU) that move the
        portrait's mesh to each of `meshes` [T, 478, 3]; frames in parallel on `pool`'s threads (OpenCV and NumPy
        release the GIL)."""
        size, working = portrait.image.shape[-1], self.appearance_encoder.config.sample_size

        head_motion = self.flow_estimator.config.head_motion

        def flow(driving: np.ndarray) -> np.ndarray:
            return prior_flow(
                portrait.landmarks, driving, size, working, person_mask=portrait.person_mask, head_motion=head_motion
            )[0]

        return _per_mesh(flow, meshes, pool)

    def warp_locks(self, portrait: PortraitEncoding, meshes: np.ndarray, pool: Executor | None = None):
        """The face decoder's `warp_lock` masks [T, 1, S, S] for `meshes` [T, 478, 3] (on the CPU), or None when
        the decoder has no `warp_lock_margin`."""
        margin = self.face_decoder.config.warp_lock_margin
        if margin is None:
            return None
        size = portrait.image.shape[-1]

        def lock(driving: np.ndarray) -> np.ndarray:
            return warp_lock(driving, size, margin=margin)

        return _per_mesh(lock, meshes, pool)[:, None]

    @torch.no_grad()
    def render(
        self, portrait: PortraitEncoding, motion_latents: torch.Tensor, batch_size: int = 16, warp_lock: bool = True
    ) -> torch.Tensor:
        """Frames [T, 3, S, S] in [0, 1] (S: the portrait crop's size) from motion latents [T, latent_dim].
        `warp_lock=False` draws with the decoder's learned blend everywhere, as if it had no `warp_lock_margin`."""
        dtype, device = self.flow_estimator.dtype, self.flow_estimator.device
        if portrait.rest is not None:
            motion_latents = motion_latents + portrait.rest.to(motion_latents)
        # Every frame's mesh in one copy from the device: no sync inside the loop, so on a GPU each batch's prior
        # flows (CPU) are computed while the batch before is still being rendered.
        meshes = self.motion_landmarks(portrait.landmarks, motion_latents)
        frames = []
        with ThreadPoolExecutor(max_workers=min(batch_size, os.cpu_count() or 1)) as pool:
            for start in range(0, motion_latents.shape[0], batch_size):
                driving = motion_latents[start : start + batch_size].to(dtype)
                batch_meshes = meshes[start : start + batch_size]
                prior = self.prior_flows(portrait, batch_meshes, pool).to(device, dtype)
                lock = self.warp_locks(portrait, batch_meshes, pool) if warp_lock else None
                flow = self.flow_estimator(portrait.latent.to(dtype), driving, portrait.features.to(dtype), prior)
                image = self.face_decoder(
                    portrait.features.to(dtype), flow.flow, flow.occlusion, portrait.image.to(dtype),
                    None if lock is None else lock.to(device, dtype),
                ).sample  # fmt: skip
                frames.append(((image.float() + 1) / 2).clamp(0, 1))
        return torch.cat(frames)

    # Putting it together -------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        portrait,
        audio_self,
        audio_other=None,
        style=None,
        num_inference_steps: int = 20,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        style_guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        image_size: int = 256,
        paste_back: bool = False,
        max_duration: float | None = None,
        render_batch_size: int = 16,
        window_overlap: int | None = None,
        close_mouth: bool = True,
        silent_mouth_rest: float = DEFAULT_SILENT_MOUTH_REST,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ) -> INFPPipelineOutput | tuple:
        """
        Args:
            portrait: a path, PIL image, uint8 array or a `FaceCrop`: one photo with one clearly visible face.
            audio_self: the agent's own voice: a path, a `(sample_rate, array)` tuple or a 16 kHz array.
            audio_other: the partner's voice in the same forms, or None for silence. Tracks of different
                lengths are padded with silence to the longer one.
            style: None, a preset name (`self.motion_guider.style_preset_names`), a style vector, reference
                motion latents [L, latent_dim], or a reference clip (video path or uint8 frames).
            num_inference_steps: DDIM steps per window.
            guidance_scale: classifier-free guidance scale for the audio-derived motion features.
            style_guidance_scale: extra guidance towards the style (used only with a style).
            image_size: side of the square face crop that is rendered.
            paste_back: return full portrait frames with the generated face pasted in, instead of the crop.
            max_duration: reject tracks longer than this many seconds.
            render_batch_size: frames rendered per renderer call.
            window_overlap: frames each motion window shares with the one before, cross-faded (0: windows end
                to end, fastest; None: a fifth of the window, which hides the seams between windows).
            close_mouth: close a portrait's parted lips before animating it, so that it listens with a closed
                mouth (the generated motion is relative to a face at rest; see `encode_portrait`).
            silent_mouth_rest: how firmly the lips are held at rest where the agent's own track is silent (1: closed
                there, easing in and out around its speech; 0: the mouth as the motion model generates it, which
                keeps it parted in about half of the listening frames; see `rest_mouth`).
            output_type: "pil", "np", "pt" or "latent" (motion latents only, nothing rendered).
            callback_on_step_end: called as `fn(pipe, step, timestep, tensors)` after every denoising step
                (steps are counted across windows); may return {"latents": ...} to replace them.
        """
        if self.motion_guider is None or self.motion_transformer is None:
            raise ValueError(
                "This pipeline has only the stage-1 face renderer: it can reenact faces (`encode_motion`, `render`) "
                "but has no audio-to-motion model. Load a checkpoint trained with training/train_motion.py."
            )
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may only hold {self._callback_tensor_inputs}.")
        check_silent_mouth_rest(silent_mouth_rest)
        window_overlap = self.resolve_window_overlap(window_overlap)
        # 1. Prepare inputs
        face = self.prepare_portrait(portrait, image_size)
        own, partner = self.prepare_audio(audio_self, audio_other, max_duration)
        own_padded, partner_padded, num_frames, padded_frames = self.pad_to_windows(own, partner, window_overlap)
        style_vector = self.prepare_style(style, image_size)
        portrait_encoding = self.encode_portrait(face, close_mouth)

        # 2-3. Encode audio and guide
        motion_features, plain_motion_features, activity = self.motion_features_for(
            own_padded, partner_padded, padded_frames, style_vector
        )
        mouth_rest_weights = self.silent_mouth_weights(activity[0], silent_mouth_rest)

        # 4. Denoise window by window; the first window continues from the portrait's own motion.
        motion_latents = self.denoise_windows(
            portrait_encoding, motion_features, plain_motion_features, num_inference_steps, guidance_scale,
            style_guidance_scale, generator, eta, window_overlap, callback_on_step_end,
            callback_on_step_end_tensor_inputs, mouth_rest_weights,
        )[:num_frames]  # fmt: skip

        mixed_audio = mix_tracks(own, partner)[: round(num_frames / self.fps * SAMPLE_RATE)]
        if output_type == "latent":
            self.maybe_free_model_hooks()
            if not return_dict:
                return (None, motion_latents, self.fps, mixed_audio)
            return INFPPipelineOutput(frames=None, motion_latents=motion_latents, fps=self.fps, audio=mixed_audio)

        # 5. Render
        frames = self.render(portrait_encoding, motion_latents, render_batch_size)
        self.maybe_free_model_hooks()

        # 6. Output
        if paste_back:
            frames = (
                torch.from_numpy(paste_back_frames(frames_to_uint8(frames), face)).permute(0, 3, 1, 2).float() / 255
            )
        if output_type == "np":
            frames = frames.permute(0, 2, 3, 1).cpu().float().numpy()
        elif output_type == "pil":
            frames = self.numpy_to_pil(frames.permute(0, 2, 3, 1).cpu().float().numpy())
        if not return_dict:
            return (frames, motion_latents, self.fps, mixed_audio)
        return INFPPipelineOutput(frames=frames, motion_latents=motion_latents, fps=self.fps, audio=mixed_audio)

    # Streaming -----------------------------------------------------------------------------------

    @torch.no_grad()
    def stream(
        self,
        portrait,
        audio_chunks: Iterable[tuple[np.ndarray, np.ndarray | None]],
        style=None,
        num_inference_steps: int = 20,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        style_guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        eta: float = 0.0,
        image_size: int = 256,
        audio_context: float = 2.0,
        render_batch_size: int = 16,
        window_overlap: int | None = None,
        paste_back: bool = False,
        close_mouth: bool = True,
        silent_mouth_rest: float = DEFAULT_SILENT_MOUTH_REST,
    ) -> Iterator[INFPStreamOutput]:
        """Generate while the audio arrives, one window at a time.

        `audio_chunks` yields (own, partner) pieces of 16 kHz mono float audio arrays, of any lengths (partner
        None: silence). As soon as the audio of a whole window (`window_size` frames) has arrived, that window is
        generated, continuing from the frames before it and cross-faded with the one before over `window_overlap`
        frames as in `__call__`, and its finished frames are yielded with their mixed audio (the frames the next
        window will fade into are held back until then). Whisper features and voice activity of a window are
        computed from its own audio plus up to `audio_context` seconds before it, so the output is close to, not
        identical with, `__call__` on the whole tracks (identical when everything fits in one window). When the
        chunks end, the last partial window is padded with silence and cut back. With `paste_back`, frames are
        the full portrait with the generated face pasted in; `close_mouth` rests the portrait's lips and
        `silent_mouth_rest` holds them at rest while the agent is silent, as in `__call__`.
        """
        if self.motion_guider is None or self.motion_transformer is None:
            raise ValueError("This pipeline has no audio-to-motion model: load a checkpoint with stage 2.")
        check_silent_mouth_rest(silent_mouth_rest)
        window_overlap = self.resolve_window_overlap(window_overlap)
        transformer = self.motion_transformer
        window, num_prev = transformer.config.window_size, transformer.config.num_prev_frames
        stride = window - window_overlap
        samples_per_frame = SAMPLE_RATE / self.fps
        context_samples = round(audio_context * SAMPLE_RATE)
        face = self.prepare_portrait(portrait, image_size)
        style_vector = self.prepare_style(style, image_size)
        portrait_encoding = self.encode_portrait(face, close_mouth)
        prev = self.initial_prev_latents(portrait_encoding)
        own = np.zeros(0, np.float32)
        partner = np.zeros(0, np.float32)
        window_index = 0
        held = None  # normalised latents generated but not yet yielded: the frames the next window fades into
        yielded = 0

        def samples(frames: int) -> int:
            return round(frames * samples_per_frame)

        def segments(start: int, end: int) -> list[np.ndarray]:
            """Both tracks' samples [start, end), zero-padded where the audio has not reached."""
            return [np.pad(x[start:end], (0, end - start - len(x[start:end]))) for x in (own, partner)]

        def generate_window() -> torch.Tensor:
            """The next window's normalised latents [1, W, latent_dim], faded in from the held frames."""
            nonlocal prev, window_index
            start, end = samples(window_index * stride), samples(window_index * stride + window)
            first = max(0, start - context_samples)
            tracks = segments(first, end)
            context_frames = round((end - first) / samples_per_frame)
            styled, plain, activity = self.motion_features_for(*tracks, context_frames, style_vector)
            weights = self.silent_mouth_weights(activity[0], silent_mouth_rest)
            latents = self.denoise_window(
                styled[:, -window:], None if plain is None else plain[:, -window:], prev, num_inference_steps,
                guidance_scale, style_guidance_scale, generator, eta, window_index, None, [], _NoProgress(),
                portrait_encoding, None if weights is None else weights[-window:],
            )  # fmt: skip
            if held is not None:
                latents = crossfade(held, latents)
            prev = latents[:, stride - num_prev : stride]
            window_index += 1
            return latents

        def emit(latents: torch.Tensor) -> INFPStreamOutput:
            """Render the next frames, normalised latents [1, n, latent_dim], with their mixed audio."""
            nonlocal yielded
            motion_latents = transformer.denormalize_latents(latents)[0]
            frames = self.render(portrait_encoding, motion_latents, render_batch_size)
            tracks = segments(samples(yielded), samples(yielded + len(motion_latents)))
            yielded += len(motion_latents)
            frames = frames.permute(0, 2, 3, 1).cpu().float().numpy()
            if paste_back:
                frames = paste_back_frames((frames * 255).round().astype(np.uint8), face).astype(np.float32) / 255
            return INFPStreamOutput(frames=frames, motion_latents=motion_latents, audio=mix_tracks(*tracks))

        for own_chunk, partner_chunk in audio_chunks:
            own_chunk = np.asarray(own_chunk, dtype=np.float32).reshape(-1)
            partner_chunk = np.zeros_like(own_chunk) if partner_chunk is None else partner_chunk
            own = np.concatenate([own, own_chunk])
            partner = np.concatenate([partner, np.asarray(partner_chunk, dtype=np.float32).reshape(-1)])
            while min(len(own), len(partner)) >= samples(window_index * stride + window):
                latents = generate_window()
                held = latents[:, stride:]
                yield emit(latents[:, :stride])
        own, partner = pad_to_same_length(own, partner)
        total_frames = round(len(own) / samples_per_frame)
        while yielded < total_frames:
            if held is not None and yielded + held.shape[1] >= total_frames:
                yield emit(held[:, : total_frames - yielded])
                break
            latents = generate_window()
            if yielded + window >= total_frames:
                yield emit(latents[:, : total_frames - yielded])
                break
            held = latents[:, stride:]
            yield emit(latents[:, :stride])
