"""Motion transformer of INFP: a 4-block diffusion transformer over motion latents.

It denoises one window of motion latents at a time. Each block runs
  self-attention over the window → motion attention (queries: the noisy latents; keys/values: the
  interactive motion features f_m) → temporal attention over the previous window's last frames
  followed by this window → feed-forward,
with every sub-layer conditioned on the diffusion timestep by adaLN-Zero. As in PixArt-α's adaLN-single,
one timestep projection is shared by all blocks and each block adds its own learned table, which keeps
the model small enough to ship (per-block projections would be most of its weights). Temporal attention
is what keeps consecutive windows continuous: its keys include the clean latents of the previous window's
last `num_prev_frames` frames. Besides motion attention, each frame's f_m is also added to that frame's
input token, so that with minutes of training data instead of INFP's hours the model need not first learn
through attention which audio frame belongs to which motion frame. For classifier-free guidance, f_m and
the previous latents can be dropped per sample; dropped inputs are replaced by learned null embeddings.

Latents are predicted in a normalised space; `latent_mean` / `latent_std` (buffers saved with the
weights) map to and from the motion encoder's space.
"""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class MotionTransformerOutput(BaseOutput):
    sample: torch.Tensor


def modulate(hidden: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return hidden * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class MotionTransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, ff_mult: int = 4):
        super().__init__()
        head_dim = dim // num_heads
        self.norm_self = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = Attention(dim, heads=num_heads, dim_head=head_dim, bias=True)
        self.norm_motion = nn.LayerNorm(dim, eps=1e-6)
        self.motion_attn = Attention(dim, cross_attention_dim=dim, heads=num_heads, dim_head=head_dim, bias=True)
        self.norm_temporal = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm_prev = nn.LayerNorm(dim, eps=1e-6)
        self.temporal_attn = Attention(dim, heads=num_heads, dim_head=head_dim, bias=True)
        self.norm_ff = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mult=ff_mult, activation_fn="gelu-approximate")
        # This block's offsets to the shared timestep modulation: shift, scale and gate for self-attention,
        # temporal attention and feed-forward. Zero gates make the block start as the identity (adaLN-Zero).
        self.modulation_table = nn.Parameter(torch.zeros(9, dim))

    def forward(
        self, hidden: torch.Tensor, motion: torch.Tensor, prev: torch.Tensor, timestep_modulation: torch.Tensor
    ) -> torch.Tensor:
        (
            shift_self, scale_self, gate_self,
            shift_temp, scale_temp, gate_temp,
            shift_ff, scale_ff, gate_ff,
        ) = (timestep_modulation + self.modulation_table).unbind(dim=1)  # fmt: skip

        hidden = hidden + gate_self.unsqueeze(1) * self.self_attn(
            modulate(self.norm_self(hidden), shift_self, scale_self)
        )
        hidden = hidden + self.motion_attn(self.norm_motion(hidden), encoder_hidden_states=motion)
        query = modulate(self.norm_temporal(hidden), shift_temp, scale_temp)
        context = torch.cat([self.norm_prev(prev), query], dim=1)
        hidden = hidden + gate_temp.unsqueeze(1) * self.temporal_attn(query, encoder_hidden_states=context)
        hidden = hidden + gate_ff.unsqueeze(1) * self.ff(modulate(self.norm_ff(hidden), shift_ff, scale_ff))
        return hidden


class MotionTransformer(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        latent_dim: int = 64,
        motion_feature_dim: int = 512,
        hidden_dim: int = 256,
        num_layers: int = 4,
        num_heads: int = 8,
        window_size: int = 50,
        num_prev_frames: int = 10,
        ff_mult: int = 4,
        timestep_channels: int = 256,
    ):
        super().__init__()
        self.latent_in = nn.Linear(latent_dim, hidden_dim)
        self.prev_in = nn.Linear(latent_dim, hidden_dim)
        self.motion_in = nn.Linear(motion_feature_dim, hidden_dim)
        # One time axis for previous and current frames: positions 0..P-1 are the previous window.
        self.pos_embed = nn.Parameter(torch.randn(num_prev_frames + window_size, hidden_dim) * 0.02)
        self.null_motion = nn.Parameter(torch.zeros(motion_feature_dim))
        self.null_prev = nn.Parameter(torch.randn(num_prev_frames, hidden_dim) * 0.02)
        self.time_proj = Timesteps(timestep_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(timestep_channels, hidden_dim)
        self.timestep_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 9 * hidden_dim))
        self.blocks = nn.ModuleList(MotionTransformerBlock(hidden_dim, num_heads, ff_mult) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.ada_ln_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        self.proj_out = nn.Linear(hidden_dim, latent_dim)
        for layer in (self.timestep_modulation[1], self.ada_ln_out[1], self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.register_buffer("latent_mean", torch.zeros(latent_dim))
        self.register_buffer("latent_std", torch.ones(latent_dim))

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.latent_mean) / self.latent_std

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.latent_std + self.latent_mean

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        motion_features: torch.Tensor | None = None,
        prev_latents: torch.Tensor | None = None,
        drop_motion_features: torch.Tensor | None = None,
        drop_prev_latents: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> MotionTransformerOutput | tuple:
        """sample: noisy normalised latents [B, W, latent_dim] (W ≤ window_size); timestep: scalar or [B];
        motion_features: f_m [B, W, motion_feature_dim] or None (unconditional); prev_latents: clean
        normalised latents [B, num_prev_frames, latent_dim] or None; drop_*: [B] bools that replace the
        input with its null embedding for those samples (classifier-free guidance)."""
        batch, length, _ = sample.shape
        num_prev = self.config.num_prev_frames
        if length > self.config.window_size:
            raise ValueError(f"Window of {length} frames exceeds window_size={self.config.window_size}.")
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        temb = self.time_embed(self.time_proj(timestep).to(sample.dtype))

        if motion_features is None:
            motion_features = self.null_motion.expand(batch, length, -1)
        elif drop_motion_features is not None:
            keep = ~drop_motion_features.to(torch.bool).view(batch, 1, 1)
            motion_features = torch.where(keep, motion_features, self.null_motion.to(motion_features.dtype))
        motion = self.motion_in(motion_features) + self.pos_embed[num_prev : num_prev + length]

        null_prev = self.null_prev.unsqueeze(0).expand(batch, -1, -1)
        if prev_latents is None:
            prev = null_prev
        else:
            if prev_latents.shape[1] != num_prev:
                raise ValueError(f"prev_latents must hold {num_prev} frames, got {prev_latents.shape[1]}.")
            prev = self.prev_in(prev_latents)
            if drop_prev_latents is not None:
                keep = ~drop_prev_latents.to(torch.bool).view(batch, 1, 1)
                prev = torch.where(keep, prev, null_prev.to(prev.dtype))
        prev = prev + self.pos_embed[:num_prev]

        hidden = self.latent_in(sample) + motion  # frame-aligned audio cue; `motion` carries the positions
        timestep_modulation = self.timestep_modulation(temb).view(batch, 9, -1)
        for block in self.blocks:
            hidden = block(hidden, motion, prev, timestep_modulation)
        shift, scale = self.ada_ln_out(temb).chunk(2, dim=-1)
        out = self.proj_out(modulate(self.norm_out(hidden), shift, scale))
        if not return_dict:
            return (out,)
        return MotionTransformerOutput(sample=out)


def base_config() -> dict:
    return dict(latent_dim=64, motion_feature_dim=512, hidden_dim=256, num_layers=4, num_heads=8, window_size=50)


def tiny_config() -> dict:
    return dict(
        latent_dim=8, motion_feature_dim=32, hidden_dim=32, num_layers=4, num_heads=2, window_size=12,
        num_prev_frames=4, timestep_channels=32,
    )  # fmt: skip
