"""Motion encoder E_m of INFP's head imitation stage.

The latent it produces has two parts, both free of identity:
- geometry: the face mesh's motion relative to a reference frame of the same face (offsets in units of
  the inter-ocular distance, `processing.landmark_offsets`) projected on a fixed basis of principal
  motions fitted on the training data (`fit_landmark_basis`). It decodes back to the mesh exactly up
  to the basis's truncation, which is what lets the renderer move any face precisely;
- appearance of the moving parts: a CNN over INFP's hybrid facial representation (eyes and lips kept,
  everything else masked, face outline drawn), for what a mesh does not say (teeth, gaze, eyelid shading).
Both training stages and the pipeline share this latent space.
"""

import hashlib
import json

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

MAX_GEOMETRY = 6.0


class MotionEncoder(ModelMixin, ConfigMixin):
    """(hybrid representation [B, 3, H, W] in [-1, 1], landmark offsets [B, N, 3]) → motion latent [B, latent_dim];
    the first `landmark_components` values are the geometry, the rest the hybrid representation's features."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        input_size: int = 128,
        block_channels: tuple[int, ...] = (32, 64, 128, 256, 256),
        latent_dim: int = 64,
        landmark_components: int = 48,
        num_landmarks: int = 478,
        norm_groups: int = 8,
    ):
        super().__init__()
        if not 0 < landmark_components < latent_dim:
            raise ValueError(f"landmark_components must be in [1, latent_dim), got {landmark_components}.")
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
        self.proj_out = nn.Linear(channels * spatial * spatial, latent_dim - landmark_components)
        # Orthonormal rows over the flattened (x, y, z) offsets, and each component's spread, so latents are ~unit.
        # Zero until `fit_landmark_basis`: an unfitted encoder sees no geometric motion at all.
        self.register_buffer("landmark_basis", torch.zeros(landmark_components, num_landmarks * 3))
        self.register_buffer("landmark_scale", torch.ones(landmark_components))

    def fingerprint(self) -> str:
        """A hash of the config and weights: motion latents made by another encoder are not comparable."""
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}  # not where it was loaded from
        digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    @torch.no_grad()
    def fit_landmark_basis(self, offsets: torch.Tensor) -> torch.Tensor:
        """Principal motions of sample offsets [M, N, 3] (about zero: no motion stays the zero latent).
        Returns the fraction of the offsets' energy the basis keeps."""
        flat = offsets.reshape(len(offsets), -1).double()
        _, singular, vh = torch.linalg.svd(flat, full_matrices=False)
        k = self.config.landmark_components
        self.landmark_basis.copy_(vh[:k].to(self.landmark_basis))
        self.landmark_scale.copy_((singular[:k] / len(flat) ** 0.5).clamp_min(1e-6).to(self.landmark_scale))
        return (singular[:k].square().sum() / singular.square().sum().clamp_min(1e-12)).float()

    def encode_landmark_offsets(self, offsets: torch.Tensor) -> torch.Tensor:
        """[B, N, 3] → geometric latent [B, landmark_components]."""
        return offsets.flatten(1).to(self.landmark_basis) @ self.landmark_basis.T / self.landmark_scale

    def decode_landmark_offsets(self, latents: torch.Tensor) -> torch.Tensor:
        """Motion latents [B, latent_dim] → landmark offsets [B, N, 3]. The geometric values have unit spread over
        the training motion; they are clamped to ±MAX_GEOMETRY so that no generated outlier can fold the face."""
        geometry = latents[:, : self.config.landmark_components].to(self.landmark_basis)
        geometry = geometry.clamp(-MAX_GEOMETRY, MAX_GEOMETRY)
        return ((geometry * self.landmark_scale) @ self.landmark_basis).reshape(len(latents), -1, 3)

    def forward(self, hybrid: torch.Tensor, landmark_offsets: torch.Tensor) -> torch.Tensor:
        size = self.config.input_size
        if hybrid.shape[-2:] != (size, size):
            hybrid = F.interpolate(hybrid, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        hidden = self.conv_in(hybrid)
        for block in self.down_blocks:
            hidden = block(hidden, None)
        hidden = F.silu(self.norm_out(hidden))
        appearance = self.proj_out(hidden.flatten(1))
        geometry = self.encode_landmark_offsets(landmark_offsets).to(appearance.dtype)
        return torch.cat([geometry, appearance], dim=1)


def base_config() -> dict:
    return dict(
        input_size=128, block_channels=(32, 64, 128, 256, 256), latent_dim=64, landmark_components=48, norm_groups=8
    )


def tiny_config() -> dict:
    return dict(input_size=32, block_channels=(8, 16), latent_dim=8, landmark_components=4, norm_groups=4)
