"""Appearance encoder of INFP's face renderer: the portrait becomes a 2-D feature volume that the
face decoder warps with the estimated flow. It runs once per portrait, so it may be heavier than
the per-frame networks. `sample_size` is the renderer's working resolution: the portrait is resized
to it here, and the decoder brings the result back to the output size."""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


class AppearanceEncoder(ModelMixin, ConfigMixin):
    """Portrait crop [B, 3, S, S] in [-1, 1] → features [B, C, S / 2**len(down_channels), ...]."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        sample_size: int = 128,
        stem_channels: int = 32,
        down_channels: tuple[int, ...] = (64, 128),
        num_res_blocks: int = 1,
        norm_groups: int = 8,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, stem_channels, kernel_size=7, padding=3)
        blocks, channels = [], stem_channels
        for out_channels in down_channels:
            blocks.append(
                ResnetBlock2D(
                    in_channels=channels, out_channels=out_channels, temb_channels=None, groups=norm_groups, down=True
                )
            )
            channels = out_channels
        blocks += [
            ResnetBlock2D(in_channels=channels, temb_channels=None, groups=norm_groups) for _ in range(num_res_blocks)
        ]
        self.blocks = nn.ModuleList(blocks)

    @property
    def out_channels(self) -> int:
        return self.config.down_channels[-1]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        size = self.config.sample_size
        if image.shape[-2:] != (size, size):
            image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        hidden = self.conv_in(image)
        for block in self.blocks:
            hidden = block(hidden, None)
        return hidden


def base_config() -> dict:
    return dict(sample_size=128, stem_channels=32, down_channels=(64, 128), num_res_blocks=1, norm_groups=8)


def tiny_config() -> dict:
    return dict(sample_size=32, stem_channels=8, down_channels=(8, 16), num_res_blocks=0, norm_groups=4)
