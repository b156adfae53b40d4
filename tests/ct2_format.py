"""A writer for synthetic CTranslate2 model.bin files (the layout ctranslate2's ModelSpec writes), so tests
can exercise the Whisper conversion without the real 145 MB weights."""

import struct
from pathlib import Path

import numpy as np

from pipeline_infp.models.audio_encoder import AudioEncoder

CT2_TYPE_IDS = {
    np.dtype("float32"): 0,
    np.dtype("int8"): 1,
    np.dtype("int16"): 2,
    np.dtype("int32"): 3,
    np.dtype("float16"): 4,
}


def _ct2_string(text: str) -> bytes:
    raw = text.encode("utf-8") + b"\x00"
    return struct.pack("<H", len(raw)) + raw


def write_ctranslate2_model(
    path: Path,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str] | None = None,
    spec: str = "WhisperSpec",
    version: int = 6,
    type_ids: dict[str, int] | None = None,
) -> Path:
    """Write `variables` (name -> array) as a CTranslate2 model.bin. `type_ids` overrides the
    dtype code of some variables (the raw bytes are written as they are)."""
    out = [struct.pack("<I", version), _ct2_string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in variables.items():
        value = np.asarray(value)  # (not ascontiguousarray: it turns 0-d scalars into 1-d)
        type_id = (type_ids or {}).get(name, CT2_TYPE_IDS.get(value.dtype))
        out += [_ct2_string(name), struct.pack("<B", value.ndim)]
        out += [struct.pack("<I", d) for d in value.shape]
        out += [struct.pack("<BI", type_id, value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [_ct2_string(alias), _ct2_string(target)]
    path.write_bytes(b"".join(out))
    return path


def ct2_variables_from_model(model: AudioEncoder, dtype=np.float16) -> dict[str, np.ndarray]:
    """The inverse of `whisper_state_dict_from_ctranslate2` (fuses q, k, v), plus decoder noise."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    v = {
        "decoder/num_heads": np.array(model.config.num_heads, dtype=np.int16),
        "decoder/embeddings/weight": np.ones((7, model.config.hidden_size), dtype=dtype),
        "encoder/conv1/weight": sd["conv1.weight"],
        "encoder/conv1/bias": sd["conv1.bias"],
        "encoder/conv2/weight": sd["conv2.weight"],
        "encoder/conv2/bias": sd["conv2.bias"],
        "encoder/layer_norm/gamma": sd["final_norm.weight"],
        "encoder/layer_norm/beta": sd["final_norm.bias"],
        "encoder/num_heads": np.array(model.config.num_heads, dtype=np.int16),
        "encoder/position_encodings/encodings": sd["positional_embedding"],
    }
    for i in range(model.config.num_layers):
        p, q = f"layers.{i}.", f"encoder/layer_{i}/"
        for w in ("weight", "bias"):
            v[q + f"self_attention/linear_0/{w}"] = np.concatenate(
                [sd[p + f"self_attn.{n}.{w}"] for n in ("q_proj", "k_proj", "v_proj")]
            )
            v[q + f"self_attention/linear_1/{w}"] = sd[p + f"self_attn.out_proj.{w}"]
            v[q + f"ffn/linear_0/{w}"] = sd[p + f"mlp.fc1.{w}"]
            v[q + f"ffn/linear_1/{w}"] = sd[p + f"mlp.fc2.{w}"]
        for src, dst in (("gamma", "weight"), ("beta", "bias")):
            v[q + f"self_attention/layer_norm/{src}"] = sd[p + f"self_attn_norm.{dst}"]
            v[q + f"ffn/layer_norm/{src}"] = sd[p + f"mlp_norm.{dst}"]
    return {k: (a.astype(dtype) if a.dtype == np.float32 else a) for k, a in v.items()}
