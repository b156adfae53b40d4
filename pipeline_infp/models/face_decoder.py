"""Warping face decoder of INFP's face renderer: it warps the portrait's feature volume with the
estimated flow, dims what the occlusion map says is not visible in the source, and synthesises
the output frame, filling those regions in from context."""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


def warp(features: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward-warp [B, C, H, W] features by a [B, 2, h, w] normalised flow (resized to H×W if needed)."""
    batch, _, height, width = features.shape
    if flow.shape[-2:] != (height, width):
        flow = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False)
    ys = (torch.arange(height, device=flow.device, dtype=flow.dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=flow.device, dtype=flow.dtype) * 2 + 1) / width - 1
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    grid = base.unsqueeze(0) + flow.permute(0, 2, 3, 1)
    if features.shape[0] != batch or grid.shape[0] != batch:
        features = features.expand(grid.shape[0], -1, -1, -1)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FaceDecoder(ModelMixin, ConfigMixin):
    """(source features, flow, occlusion) → frame [B, 3, S, S] in about [-1, 1]."""

    @register_to_config
    def __init__(
        self,
        feature_channels: int = 128,
        num_mid_blocks: int = 1,
        up_channels: tuple[int, ...] = (64, 32),
        out_channels: int = 3,
        norm_groups: int = 8,
    ):
        super().__init__()
        self.mid_blocks = nn.ModuleList(
            ResnetBlock2D(in_channels=feature_channels, temb_channels=None, groups=norm_groups)
            for _ in range(num_mid_blocks)
        )
        blocks, channels = [], feature_channels
        for up in up_channels:
            blocks.append(
                ResnetBlock2D(in_channels=channels, out_channels=up, temb_channels=None, groups=norm_groups, up=True)
            )
            channels = up
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(norm_groups, channels)
        self.conv_out = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)

    def forward(self, source_features: torch.Tensor, flow: torch.Tensor, occlusion: torch.Tensor) -> torch.Tensor:
        warped = warp(source_features, flow)
        if occlusion.shape[-2:] != warped.shape[-2:]:
            occlusion = F.interpolate(occlusion, size=warped.shape[-2:], mode="bilinear", align_corners=False)
        hidden = warped * occlusion
        for block in self.mid_blocks:
            hidden = block(hidden, None)
        for block in self.up_blocks:
            hidden = block(hidden, None)
        return self.conv_out(F.silu(self.norm_out(hidden)))


def base_config() -> dict:
    return dict(feature_channels=128, num_mid_blocks=1, up_channels=(64, 32), norm_groups=8)


def tiny_config() -> dict:
    return dict(feature_channels=16, num_mid_blocks=0, up_channels=(8, 8), norm_groups=4)
