"""Motion flow estimator F of INFP's face renderer.

It predicts a dense backward flow (for every pixel of the output, where to sample the source) and an
occlusion map. It starts from the geometric prior flow that the motion latents' mesh gives
(`processing.prior_flow`, computed by the pipeline) and adds a learned correction at the feature
resolution: what the mesh misses (hair, neck, shoulders, the inside of the mouth, landmark error). The
source features and the prior are its inputs, so the correction follows this face's layout; the motion
latents enter through scale-shift modulation of every residual block. The flow is returned explicitly,
in normalised [-1, 1] image coordinates, at the prior's resolution.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class FlowEstimatorOutput(BaseOutput):
    """flow: [B, 2, h, w] (x, y) displacement in normalised coordinates; occlusion: [B, 1, h, w] in (0, 1)."""

    flow: torch.Tensor
    occlusion: torch.Tensor


def identity_grid(batch: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """Pixel-centre coordinates in [-1, 1] as [B, 2, H, W] (x first), matching grid_sample(align_corners=False)."""
    ys = (torch.arange(height, device=device, dtype=dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=device, dtype=dtype) * 2 + 1) / width - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=0)
    return grid.unsqueeze(0).expand(batch, -1, -1, -1)


class FlowEstimator(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        latent_dim: int = 64,
        feature_channels: int = 128,
        motion_embed_dim: int = 256,
        block_channels: tuple[int, ...] = (64, 128, 128),
        norm_groups: int = 8,
        occlusion_init: float = 3.0,
        person_prior: bool = False,
        head_motion: str = "affine",
    ):
        """`person_prior`, `head_motion`: the prior flow this estimator was trained on, so the pipeline computes the
        same one: carried over the source's person mask (`processing.prior_flow(person_mask=...)`) or not, with the
        head's 2-D affine ("affine") or 3-D rigid ("rigid") motion."""
        super().__init__()
        self.motion_embed = nn.Sequential(
            nn.Linear(3 * latent_dim, motion_embed_dim), nn.SiLU(), nn.Linear(motion_embed_dim, motion_embed_dim)
        )
        # +2 input channels: the coordinate grid, so the flow can depend on position; +2: the prior flow.
        self.conv_in = nn.Conv2d(feature_channels + 4, block_channels[0], kernel_size=3, padding=1)

        def block(cin, cout, **kwargs):
            return ResnetBlock2D(
                in_channels=cin,
                out_channels=cout,
                temb_channels=motion_embed_dim,
                time_embedding_norm="scale_shift",
                groups=norm_groups,
                **kwargs,
            )

        self.down_blocks = nn.ModuleList()
        channels = block_channels[0]
        skip_channels = []
        for i, out_channels in enumerate(block_channels):
            self.down_blocks.append(block(channels, out_channels, down=i > 0))
            channels = out_channels
            skip_channels.append(channels)
        self.up_blocks = nn.ModuleList()
        for skip in reversed(skip_channels[:-1]):
            self.up_blocks.append(block(channels + skip, skip))
            channels = skip
        self.norm_out = nn.GroupNorm(norm_groups, channels)
        self.conv_out = nn.Conv2d(channels, 3, kernel_size=3, padding=1)
        # Start from the prior flow with everything visible.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        with torch.no_grad():
            self.conv_out.bias[2] = occlusion_init

    def forward(
        self,
        source_latent: torch.Tensor,
        driving_latent: torch.Tensor,
        source_features: torch.Tensor,
        prior_flow: torch.Tensor,
        return_dict: bool = True,
    ) -> FlowEstimatorOutput | tuple:
        """prior_flow: [B, 2, h, w] at any resolution (the output's); the others as in the pipeline's `render`."""
        if source_latent.shape[0] != driving_latent.shape[0]:
            source_latent = source_latent.expand(driving_latent.shape[0], -1)
        if source_features.shape[0] != driving_latent.shape[0]:
            source_features = source_features.expand(driving_latent.shape[0], -1, -1, -1)
        motion = self.motion_embed(torch.cat([source_latent, driving_latent, driving_latent - source_latent], dim=-1))
        batch, _, height, width = source_features.shape
        grid = identity_grid(batch, height, width, source_features.device, source_features.dtype)
        prior = prior_flow.to(source_features.dtype)
        coarse_prior = F.interpolate(prior, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        hidden = self.conv_in(torch.cat([source_features, grid, coarse_prior], dim=1))
        skips = []
        for block in self.down_blocks:
            hidden = block(hidden, motion)
            skips.append(hidden)
        skips.pop()
        for block in self.up_blocks:
            skip = skips.pop()
            hidden = F.interpolate(hidden, size=skip.shape[-2:], mode="nearest")
            hidden = block(torch.cat([hidden, skip], dim=1), motion)
        out = self.conv_out(F.silu(self.norm_out(hidden)))
        correction = F.interpolate(out[:, :2], size=prior.shape[-2:], mode="bilinear", align_corners=False)
        flow, occlusion = prior + correction, torch.sigmoid(out[:, 2:3])
        if not return_dict:
            return flow, occlusion
        return FlowEstimatorOutput(flow=flow, occlusion=occlusion)


def base_config() -> dict:
    return dict(
        latent_dim=64, feature_channels=128, motion_embed_dim=256, block_channels=(64, 128, 128), norm_groups=8
    )


def tiny_config() -> dict:
    return dict(latent_dim=8, feature_channels=16, motion_embed_dim=16, block_channels=(8, 16), norm_groups=4)
