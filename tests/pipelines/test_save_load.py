"""Saved pipelines are self-contained Hub folders that load both ways and reproduce the same video."""

import json
import shutil
from copy import deepcopy

import numpy as np
import pytest
import soundfile as sf
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

from pipeline_infp import INFPPipeline, MotionGuider, build_pipeline, export_for_hub
from pipeline_infp.pipeline_infp import COMPONENT_CLASSES
from pipeline_infp.processing import FaceProcessor, read_audio_track, read_video, write_video
from tests.ct2_format import ct2_variables_from_model, write_ctranslate2_model
from tests.pipelines.test_pipeline_infp import IMAGE_SIZE, speech
from tests.utils import randomize


@pytest.fixture(scope="module")
def face(shared_data):
    with FaceProcessor() as processor:
        return processor.crop_portrait(
            shared_data / "portraits" / "sadtalker-source-image-people-0.png", size=IMAGE_SIZE
        )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = build_pipeline("tiny", seed=0)
    for name in ("motion_guider", "motion_transformer", "flow_estimator", "face_decoder"):
        randomize(getattr(pipe, name), seed=2, std=0.02)
    folder = tmp_path_factory.mktemp("saved")
    pipe.save_pretrained(folder)
    return pipe, folder


def generate(pipe, face, own, other=None):
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        face, own, other, num_inference_steps=2, image_size=IMAGE_SIZE, output_type="np",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip


def test_folder_is_in_self_contained_hub_layout(saved):
    _, folder = saved
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_infp", "INFPPipeline"]
    assert (folder / "pipeline_infp.py").is_file()
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    for name, class_name in COMPONENT_CLASSES.items():
        module = index[name][0]
        assert index[name] == [module, class_name]
        for file in (f"{module}.py", "config.json", "diffusion_pytorch_model.safetensors"):
            assert (folder / name / file).is_file(), f"{name}/{file}"


def test_round_trip_through_both_loading_paths_gives_the_same_video(saved, face, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe, folder = saved
    own, other = speech(0.7), speech(0.7, seed=5)
    expected = generate(pipe, face, own, other)

    ours = INFPPipeline.from_pretrained(folder)
    assert type(ours.motion_guider) is MotionGuider  # the package's classes, not the folder's code copies
    remote = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(remote).__name__ == "INFPPipeline" and type(remote.motion_guider) is not MotionGuider
    for loaded in (ours, remote):
        out = generate(loaded, face, own, other)
        # Same weights bit for bit; loaded tensors can take other kernels (memory layout), hence float-level slack.
        assert np.allclose(out.frames, expected.frames, atol=1e-5)
        assert torch.allclose(out.motion_latents, expected.motion_latents, atol=1e-5)


def test_plain_diffusers_loading_refuses_code_without_trust(saved):
    _, folder = saved
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(folder)


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_random_pipeline_from_a_folder_makes_an_mp4_with_sound(saved, shared_data, tmp_path, trust_remote_code):
    """Real portrait file + real 16 kHz speech file → mp4 whose video and sound have the audio's length."""
    _, folder = saved
    loader = DiffusionPipeline if trust_remote_code else INFPPipeline
    pipe = loader.from_pretrained(folder, trust_remote_code=trust_remote_code)
    speech_file = shared_data / "audio" / "dreamtalk-spanish1.wav"
    out = generate(pipe, shared_data / "portraits" / "liveportrait-source-s1.jpg", speech_file)
    path = write_video(tmp_path / "out.mp4", out.frames, out.fps, out.audio)
    frames, fps = read_video(path)
    expected_frames = round(sf.info(speech_file).duration * 25)
    assert len(frames) == len(out.frames) == expected_frames and fps == 25
    sound = read_audio_track(path)
    assert sound is not None and abs(len(sound) / 16000 - expected_frames / 25) < 0.05
    assert np.abs(sound).max() > 0.05  # the speech is in the file, not silence


def test_exported_folder_without_whisper_weights_converts_them_on_load(saved, face, tmp_path, monkeypatch):
    """export_for_hub leaves the Whisper encoder out; both loading paths rebuild it from CTranslate2 files."""
    pipe, _ = saved
    whisper = write_ctranslate2_model(
        tmp_path / "model.bin", ct2_variables_from_model(pipe.audio_encoder, dtype=np.float32)
    )
    monkeypatch.setenv("INFP_WHISPER_CT2", str(whisper))
    monkeypatch.setenv("INFP_CACHE", str(tmp_path / "cache"))
    card = tmp_path / "card.md"
    card.write_text("---\nlibrary_name: diffusers\n---\n# test card\n")
    folder = export_for_hub(pipe, tmp_path / "export", model_card=card)
    assert not list((folder / "audio_encoder").glob("*.safetensors"))
    assert (folder / "audio_encoder" / "config.json").is_file()
    assert (folder / "README.md").read_text() == card.read_text()
    # A pipeline loaded from a folder remembers its path; the export must not carry that local path.
    loaded = INFPPipeline.from_pretrained(saved[1])
    assert loaded.config["_name_or_path"] == str(saved[1])
    reexported = export_for_hub(loaded, tmp_path / "again", model_card=card)
    assert not any("_name_or_path" in path.read_text() for path in reexported.rglob("*.json"))

    own = speech(0.5)
    expected = generate(pipe, face, own)
    for loaded in (
        INFPPipeline.from_pretrained(folder),
        DiffusionPipeline.from_pretrained(folder, trust_remote_code=True),
    ):
        assert np.allclose(generate(loaded, face, own).frames, expected.frames, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="Model card"):
        export_for_hub(pipe, tmp_path / "other", model_card=tmp_path / "missing.md")


def test_a_renderer_only_checkpoint_loads_and_reenacts_but_cannot_generate(saved, face, tmp_path):
    pipe, _ = saved
    renderer_only = INFPPipeline(**{**pipe.components, "motion_guider": None, "motion_transformer": None})
    renderer_only.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["motion_guider"] == [None, None] and not (tmp_path / "motion_guider").exists()

    for loaded in (
        INFPPipeline.from_pretrained(tmp_path),
        DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True),
    ):
        assert loaded.motion_guider is None and loaded.motion_transformer is None
        latents = loaded.encode_motion(face.image[None], face.landmarks[None])
        frames = loaded.render(loaded.encode_portrait(face), latents.repeat(3, 1))
        expected = pipe.render(pipe.encode_portrait(face), latents.repeat(3, 1))
        assert frames.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.allclose(frames, expected, atol=1e-5)
        with pytest.raises(ValueError, match="only the stage-1 face renderer"):
            loaded(face, speech(0.3))


def test_a_folder_saved_before_the_direct_style_path_loads_and_keeps_its_outputs(saved, face, tmp_path):
    pipe, folder = saved
    shutil.copytree(folder, tmp_path / "old")
    weights = tmp_path / "old" / "motion_guider" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    added = [k for k in state if k.startswith("style_to_features.") or k.startswith("style_encoder.mean_proj.")]
    assert len(added) == 3
    save_file({k: v for k, v in state.items() if k not in added}, weights)

    loaded = INFPPipeline.from_pretrained(tmp_path / "old")  # no weights left on the meta device
    assert torch.all(loaded.motion_guider.style_to_features.weight == 0)
    old = deepcopy(pipe)
    torch.nn.init.zeros_(old.motion_guider.style_to_features.weight)
    own = speech(0.5)
    assert torch.allclose(
        generate(loaded, face, own).motion_latents, generate(old, face, own).motion_latents, atol=1e-5
    )


def test_the_bundled_checkpoint_is_complete_and_its_code_copies_are_current():
    """`checkpoints/infp-base` must load with the code it carries (trust_remote_code): its copies must be today's."""
    from pathlib import Path

    import pipeline_infp

    folder = Path(__file__).resolve().parents[2] / "checkpoints" / "infp-base"
    package = Path(pipeline_infp.__file__).parent
    index = json.loads((folder / "model_index.json").read_text())
    assert all(index[name][0] is not None for name in COMPONENT_CLASSES)  # both stages are bundled
    copies = sorted(folder.rglob("*.py"))
    assert copies
    for copy in copies:
        originals = [p for p in package.rglob(copy.name) if "checkpoints" not in p.parts]
        assert len(originals) == 1, copy
        assert copy.read_text() == originals[0].read_text(), f"{copy} is stale: re-export or copy it"
