"""Interactive motion guider of INFP.

Two learnable memory banks hold motion prototypes: a verbal bank M_v (talking) and a non-verbal bank
M_nv (listening: nods, smiles, blinks). Features of the agent's own voice query M_v and features of
the partner's voice query M_nv by cross-attention; the two retrievals are added and an MLP turns
them into the interactive motion feature f_m that conditions the motion transformer. Nothing
decides explicitly who speaks: a loud own track retrieves talking motion, a loud partner track
listening motion, both at once a mixture.

A motion style vector s_m edits the bank embeddings through StyleGAN2 weight modulation and
demodulation. s_m is computed by a small style encoder from a reference motion-latent sequence,
is taken from a named preset, or is zero (no style: the modulation then reduces to a fixed,
demodulated projection, which is what classifier-free guidance uses as its unconditional branch).
Beside the paper's modulation, s_m is also projected straight onto f_m: the modulation only reshapes
the prototypes that attention retrieves, and alone it never learned to carry an expression (a happy
preset moved the generated face by < 1 % of a smile after 1200 CPU steps). The style encoder sees the
reference's mean latent directly too, because a lasting expression (a smile, lowered brows) is exactly
that mean.

The per-track audio projections live here rather than in the audio encoder, which stays the
frozen Whisper encoder converted from its published weights.
"""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class MotionGuiderOutput(BaseOutput):
    """motion_features: f_m [B, T, hidden]; verbal / non_verbal: the two retrievals before fusion."""

    motion_features: torch.Tensor
    verbal: torch.Tensor
    non_verbal: torch.Tensor


class ModulatedLinear(nn.Module):
    """StyleGAN2 modulated linear layer: per-sample input scales from the style, then demodulation."""

    def __init__(self, dim: int, style_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.affine = nn.Linear(style_dim, dim)
        # A zero style must leave the weight unchanged: scales of exactly one.
        nn.init.zeros_(self.affine.weight)
        nn.init.ones_(self.affine.bias)

    def forward(self, embeddings: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        scales = self.affine(style)  # [B, in]
        weight = self.weight.unsqueeze(0) * scales.unsqueeze(1)  # [B, out, in]
        weight = weight * torch.rsqrt(weight.pow(2).sum(dim=2, keepdim=True) + 1e-8)
        return torch.einsum("ni,boi->bno", embeddings, weight)


class MotionStyleEncoder(nn.Module):
    """Reference motion latents [B, L, latent_dim] (any L ≥ 1) → style vector s_m [B, style_dim]."""

    def __init__(self, latent_dim: int, hidden_dim: int, style_dim: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(latent_dim, hidden_dim, kernel_size=5, padding=2),
            nn.SiLU(),
            nn.Conv1d(hidden_dim, hidden_dim, kernel_size=5, padding=2),
            nn.SiLU(),
        )
        # Mean and spread over time: how a person moves and the expression they hold, not when.
        self.proj = nn.Linear(2 * hidden_dim, style_dim)
        self.mean_proj = nn.Linear(latent_dim, style_dim)

    def forward(self, motion_latents: torch.Tensor) -> torch.Tensor:
        hidden = self.convs(motion_latents.transpose(1, 2))
        std = hidden.std(dim=2, unbiased=False)
        return self.proj(torch.cat([hidden.mean(dim=2), std], dim=1)) + self.mean_proj(motion_latents.mean(dim=1))


class MotionGuider(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        audio_feature_dim: int = 2560,
        hidden_dim: int = 512,
        bank_size: int = 64,
        num_heads: int = 8,
        style_dim: int = 128,
        latent_dim: int = 64,
        style_hidden_dim: int = 256,
        style_presets: dict[str, list[float]] | None = None,
    ):
        super().__init__()
        self.own_audio_proj = nn.Sequential(nn.LayerNorm(audio_feature_dim), nn.Linear(audio_feature_dim, hidden_dim))
        self.partner_audio_proj = nn.Sequential(
            nn.LayerNorm(audio_feature_dim), nn.Linear(audio_feature_dim, hidden_dim)
        )
        # Voice activity is a cheap, explicit cue of who is speaking, added to each query.
        self.own_activity = nn.Parameter(torch.zeros(hidden_dim))
        self.partner_activity = nn.Parameter(torch.zeros(hidden_dim))

        # Unit-scale prototypes: tiny ones make every query attend uniformly, and retrieval starts untrainably flat.
        self.verbal_bank = nn.Parameter(torch.randn(bank_size, hidden_dim))
        self.non_verbal_bank = nn.Parameter(torch.randn(bank_size, hidden_dim))
        self.verbal_modulation = ModulatedLinear(hidden_dim, style_dim)
        self.non_verbal_modulation = ModulatedLinear(hidden_dim, style_dim)

        head_dim = hidden_dim // num_heads
        self.verbal_norm = nn.LayerNorm(hidden_dim)
        self.non_verbal_norm = nn.LayerNorm(hidden_dim)
        self.verbal_attn = Attention(hidden_dim, cross_attention_dim=hidden_dim, heads=num_heads, dim_head=head_dim)
        self.non_verbal_attn = Attention(
            hidden_dim, cross_attention_dim=hidden_dim, heads=num_heads, dim_head=head_dim
        )
        self.fusion_norm = nn.LayerNorm(hidden_dim)
        self.fusion_mlp = FeedForward(hidden_dim, mult=2, activation_fn="gelu")

        self.style_encoder = MotionStyleEncoder(latent_dim, style_hidden_dim, style_dim)
        # Zero at first, so a guider trained without this path keeps its outputs until fine-tuning uses it; no bias,
        # so a zero style still means no style.
        self.style_to_features = nn.Linear(style_dim, hidden_dim, bias=False)
        nn.init.zeros_(self.style_to_features.weight)

    @property
    def style_preset_names(self) -> list[str]:
        return sorted(self.config.style_presets or {})

    def style_preset(self, name: str) -> torch.Tensor:
        """A named style vector saved with the checkpoint (e.g. "happy"); "neutral"/"none" without presets is zero."""
        presets = self.config.style_presets or {}
        if name in presets:
            return torch.tensor(presets[name], device=self.device, dtype=self.dtype)
        if name in ("none", "neutral"):
            return torch.zeros(self.config.style_dim, device=self.device, dtype=self.dtype)
        raise ValueError(
            f"Unknown style preset {name!r}. This checkpoint has: {', '.join(self.style_preset_names) or 'none'}; "
            "pass one of those, a style vector, or a reference clip."
        )

    def encode_style(self, motion_latents: torch.Tensor) -> torch.Tensor:
        """Style vector from a reference motion-latent sequence [B, L, latent_dim] or [L, latent_dim]."""
        if motion_latents.ndim == 2:
            motion_latents = motion_latents.unsqueeze(0)
        return self.style_encoder(motion_latents)

    def forward(
        self,
        own_audio: torch.Tensor,
        partner_audio: torch.Tensor,
        style: torch.Tensor | None = None,
        own_activity: torch.Tensor | None = None,
        partner_activity: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> MotionGuiderOutput | tuple:
        """own_audio / partner_audio: [B, T, audio_feature_dim]; style: [B, style_dim] or None (zero);
        activities: [B, T] voice activity in [0, 1] or None."""
        batch = own_audio.shape[0]
        if style is None:
            style = own_audio.new_zeros(batch, self.config.style_dim)
        elif style.ndim == 1:
            style = style.unsqueeze(0).expand(batch, -1)

        own_query = self.own_audio_proj(own_audio)
        partner_query = self.partner_audio_proj(partner_audio)
        if own_activity is not None:
            own_query = own_query + own_activity.unsqueeze(-1).to(own_query.dtype) * self.own_activity
        if partner_activity is not None:
            partner_query = (
                partner_query + partner_activity.unsqueeze(-1).to(partner_query.dtype) * self.partner_activity
            )

        verbal_bank = self.verbal_modulation(self.verbal_bank, style)
        non_verbal_bank = self.non_verbal_modulation(self.non_verbal_bank, style)
        # The own voice's retrieval is residual, as in a transformer's cross-attention: its audio detail (which
        # syllable, now) reaches f_m beside the retrieved prototypes. Without it the lips never learned to follow
        # the speech (mouth correlation 0.07 after 4000 CPU steps; 0.43 with it after 3200, `evaluate motion`).
        # The partner's voice reaches f_m only through the non-verbal prototypes: a listener reacts to it but
        # must not mouth its syllables.
        verbal = own_query + self.verbal_attn(self.verbal_norm(own_query), encoder_hidden_states=verbal_bank)
        non_verbal = self.non_verbal_attn(self.non_verbal_norm(partner_query), encoder_hidden_states=non_verbal_bank)
        fused = verbal + non_verbal
        motion_features = fused + self.fusion_mlp(self.fusion_norm(fused)) + self.style_to_features(style).unsqueeze(1)
        if not return_dict:
            return motion_features, verbal, non_verbal
        return MotionGuiderOutput(motion_features=motion_features, verbal=verbal, non_verbal=non_verbal)


def base_config() -> dict:
    return dict(audio_feature_dim=2560, hidden_dim=512, bank_size=64, num_heads=8, style_dim=128, latent_dim=64)


def tiny_config() -> dict:
    return dict(
        audio_feature_dim=160, hidden_dim=32, bank_size=8, num_heads=2, style_dim=8, latent_dim=8, style_hidden_dim=16
    )
