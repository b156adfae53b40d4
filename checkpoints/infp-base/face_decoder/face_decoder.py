"""Warping face decoder of INFP's face renderer.

It warps the portrait's feature volume with the estimated flow, dims what the occlusion map says is
not visible in the source, and synthesises the frame at the renderer's working resolution. The output
at full resolution blends two things with a predicted per-pixel mask: the source image itself warped by
the same (upsampled) flow, which keeps the portrait's detail sharp at any output size, and the
synthesised frame, which supplies what warping cannot (an opened mouth, teeth, disocclusions). With
`warp_lock_margin` set, the face itself and a band round it are the warped source alone (the `warp_lock`
input overrides the blend there): synthesised pixels on the face shift the expression a face tracker reads,
the warp follows the driving mesh.
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
class FaceDecoderOutput(BaseOutput):
    """sample: the frame [B, 3, H, W]; warped: the source image warped by the flow; blend: [B, 1, H, W],
    the weight of `warped` in `sample` (1 − blend is the synthesised part)."""

    sample: torch.Tensor
    warped: torch.Tensor
    blend: torch.Tensor


def warp(features: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward-warp [B, C, H, W] features by a [B, 2, h, w] normalised flow (resized to H×W if needed)."""
    batch, _, height, width = features.shape
    if flow.shape[-2:] != (height, width):
        flow = F.interpolate(flow, size=(height, width), mode="bilinear", align_corners=False)
    ys = (torch.arange(height, device=flow.device, dtype=flow.dtype) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=flow.device, dtype=flow.dtype) * 2 + 1) / width - 1
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
    grid = base.unsqueeze(0) + flow.permute(0, 2, 3, 1)
    if features.shape[0] != grid.shape[0]:
        features = features.expand(grid.shape[0], -1, -1, -1)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FaceDecoder(ModelMixin, ConfigMixin):
    """(source features, flow, occlusion, source image) → frame at the source image's resolution."""

    @register_to_config
    def __init__(
        self,
        feature_channels: int = 128,
        num_mid_blocks: int = 1,
        up_channels: tuple[int, ...] = (64, 32),
        norm_groups: int = 8,
        blend_init: float = 2.0,
        warp_lock_margin: float | None = None,
    ):
        """`warp_lock_margin`: the band round the face oval (in face sizes) of the `warp_lock` mask the pipeline
        computes for this decoder (`processing.warp_lock`), or None for the learned blend everywhere."""
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
        self.conv_out = nn.Conv2d(channels, 4, kernel_size=3, padding=1)  # RGB + blend logit
        # Start by mostly copying the warped source: the identity flow then reproduces the portrait.
        with torch.no_grad():
            self.conv_out.bias[3] = blend_init

    def forward(
        self,
        source_features: torch.Tensor,
        flow: torch.Tensor,
        occlusion: torch.Tensor,
        source_image: torch.Tensor,
        warp_lock: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FaceDecoderOutput | tuple:
        """source_image: the portrait crop [B or 1, 3, H, W] in [-1, 1] at the output resolution; warp_lock:
        [B, 1, H, W] in [0, 1], where the output is the warped source regardless of the learned blend."""
        hidden = warp(source_features, flow)
        if occlusion.shape[-2:] != hidden.shape[-2:]:
            occlusion = F.interpolate(occlusion, size=hidden.shape[-2:], mode="bilinear", align_corners=False)
        hidden = hidden * occlusion
        for block in self.mid_blocks:
            hidden = block(hidden, None)
        for block in self.up_blocks:
            hidden = block(hidden, None)
        out = self.conv_out(F.silu(self.norm_out(hidden)))
        size = source_image.shape[-2:]
        if out.shape[-2:] != size:
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        synthesised, blend = out[:, :3], torch.sigmoid(out[:, 3:])
        if warp_lock is not None:
            blend = torch.maximum(blend, warp_lock.to(blend))
        warped = warp(source_image, flow)
        sample = blend * warped + (1 - blend) * synthesised
        if not return_dict:
            return sample, warped, blend
        return FaceDecoderOutput(sample=sample, warped=warped, blend=blend)


def base_config() -> dict:
    return dict(feature_channels=128, num_mid_blocks=1, up_channels=(64, 32), norm_groups=8)


def tiny_config() -> dict:
    return dict(feature_channels=16, num_mid_blocks=0, up_channels=(8, 8), norm_groups=4)
