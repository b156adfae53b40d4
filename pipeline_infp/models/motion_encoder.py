"""Motion encoder E_m of INFP's head imitation stage.

It sees only the hybrid facial representation (eyes and lips kept, everything else masked, face
outline points drawn on top), so the 1-D latent it produces carries pose and expression but not
identity, hair or background. Both training stages and the pipeline share this latent space.
"""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


class MotionEncoder(ModelMixin, ConfigMixin):
    """Hybrid representation image [B, 3, H, W] in [-1, 1] → motion latent [B, latent_dim]."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        input_size: int = 128,
        block_channels: tuple[int, ...] = (32, 64, 128, 256, 256),
        latent_dim: int = 64,
        norm_groups: int = 8,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_channels[0], kernel_size=3, padding=1)
        blocks, channels = [], block_channels[0]
        for out_channels in block_channels:
            blocks.append(
                ResnetBlock2D(
                    in_channels=channels, out_channels=out_channels, temb_channels=None, groups=norm_groups, down=True
                )
            )
            channels = out_channels
        self.down_blocks = nn.ModuleList(blocks)
        spatial = input_size // 2 ** len(block_channels)
        self.norm_out = nn.GroupNorm(norm_groups, channels)
        self.proj_out = nn.Linear(channels * spatial * spatial, latent_dim)

    def forward(self, hybrid: torch.Tensor) -> torch.Tensor:
        size = self.config.input_size
        if hybrid.shape[-2:] != (size, size):
            hybrid = F.interpolate(hybrid, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        hidden = self.conv_in(hybrid)
        for block in self.down_blocks:
            hidden = block(hidden, None)
        hidden = F.silu(self.norm_out(hidden))
        return self.proj_out(hidden.flatten(1))


def base_config() -> dict:
    return dict(input_size=128, block_channels=(32, 64, 128, 256, 256), latent_dim=64, norm_groups=8)


def tiny_config() -> dict:
    return dict(input_size=32, block_channels=(8, 16), latent_dim=8, norm_groups=4)
