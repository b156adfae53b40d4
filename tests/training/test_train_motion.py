"""The stage-2 training script: dyadic windows from one-sided clips, a few steps, resuming, export, 2 processes."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline_infp import INFPPipeline
from pipeline_infp.processing import landmark_offsets
from tests.training.test_prepare_motion import save_tiny_pipeline
from tests.utils import tiny_model
from training import prepare_motion
from training.prepared import PreparedDataset
from training.train_motion import (
    MOTION_MODEL,
    STABLE_POINTS,
    MotionData,
    MotionModel,
    MotionWindowDataset,
    build_motion_model,
    expression_offsets,
    init_from_pipeline,
    main,
    parse_args,
    place_turns,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "training" / "train_motion.py"


@pytest.fixture(scope="module")
def motion_setup(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train-motion")
    save_tiny_pipeline(tmp / "renderer", seed=0)
    prepare_motion.main(
        ["--data_dir", str(data_dir), "--checkpoint", str(tmp / "renderer"), "--out", str(tmp / "motion")]
    )
    return tmp


def tiny_args(data_dir, setup, output_dir, *extra):
    return ["--data_dir", str(data_dir), "--motion_dir", str(setup / "motion"), "--renderer", str(setup / "renderer"),
            "--output_dir", str(output_dir), "--config", "tiny", "--dataloader_num_workers", "0", *extra]  # fmt: skip


def test_partner_turns_fill_only_the_own_pauses_unless_they_overlap():
    own_vad = np.array([1] * 10 + [0] * 12 + [1] * 5 + [0] * 3 + [1] * 10, dtype=np.float32)  # pauses of 12 and 3
    silence, quiet = np.zeros((40, 4), np.float32), np.zeros(40, np.float32)
    speech = (np.ones((40, 4), np.float32), np.ones(40, np.float32))
    rng = np.random.default_rng(0)
    features, vad = place_turns(silence, quiet, own_vad, speech, overlap=False, rng=rng)
    assert np.array_equal(vad, np.r_[[0] * 10, [1] * 12, [0] * 18])  # the 3-frame pause is too short for a turn
    assert np.array_equal(features[:, 0], vad)
    features, vad = place_turns(silence, quiet, own_vad, speech, overlap=True, rng=rng)
    assert (vad * own_vad).sum() > 0  # both speak at once somewhere


def test_windows_are_one_sided_during_warmup_and_take_turns_after(data_dir, motion_setup):
    args = parse_args(tiny_args(data_dir, motion_setup, "/unused", "--partner_turn_prob", "1", "--overlap_prob", "0"))
    motion = MotionData(PreparedDataset(data_dir), Path(args.motion_dir), ["talking"], ["nonverbal"], 16)
    assert motion.speaking and motion.speech
    dataset = MotionWindowDataset(motion, args, num_prev=4, window=12, samples_per_step=2)
    sample = dataset[0]  # step 0: warm-up
    assert sample["latents"].shape == (16, 8) and sample["own"].shape == sample["partner"].shape == (12, 160)
    assert sample["style_latents"].shape == (12, 8)
    assert torch.all(sample["partner_vad"] == 0)
    assert all(torch.equal(sample[k], dataset[0][k]) for k in sample)  # a window is a function of its index
    after = [dataset[i] for i in range(2 * args.warmup_steps, 2 * args.warmup_steps + 6)]
    for window in after:  # the partner speaks only where the agent is silent
        assert torch.all(window["partner_vad"] * window["own_vad"] == 0)


def test_the_own_track_is_read_later_by_a_clips_audio_video_offset(data_dir, motion_setup):
    motion = MotionData(PreparedDataset(data_dir), motion_setup / "motion", ["talking"], ["nonverbal"], 16)
    clip = motion.speaking[0]
    features, vad = np.asarray(motion.whisper(clip), np.float32), np.asarray(clip.vad, np.float32)
    timeline = np.asarray(clip.indices)[:12]
    assert isinstance(motion.index[clip.id]["av_offset"], int)  # measured by prepare_motion.py
    motion.index[clip.id]["av_offset"] = 0
    own, own_vad = motion.own_track(clip, timeline)
    np.testing.assert_array_equal(own, features[timeline])
    motion.index[clip.id]["av_offset"] = 3  # the sound runs 3 frames late
    own, own_vad = motion.own_track(clip, timeline)
    np.testing.assert_array_equal(own, features[timeline + 3])
    np.testing.assert_array_equal(own_vad, vad[timeline + 3])
    end = np.array([len(features) - 2, len(features) - 1])
    np.testing.assert_array_equal(motion.own_track(clip, end)[0], features[[-1, -1]])  # clamped at the track's end


def test_expression_offsets_measure_each_emotion_against_the_same_persons_neutral_face():
    rng = np.random.default_rng(0)
    neutral = rng.normal(100.0, 30.0, (478, 3))
    neutral[[13, 14]] = neutral[13]  # a closed mouth
    smile = np.zeros((478, 3))
    moving = np.setdiff1d(np.arange(478), [*STABLE_POINTS, 13, 14])[:40]
    smile[moving, 1] = -4.0  # part of the face moves up, the stable points stay

    def posed(mesh, degrees, scale, shift):  # the same face under another head pose and crop
        angle = np.deg2rad(degrees)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        return scale * mesh @ rotation.T + shift

    meshes = {
        "x-m1-happy-1": [posed(neutral + smile, d, 1.3, 7.0) for d in (5, 12, -4, 0)],
        "x-m1-neutral-1": [posed(neutral, d, 0.9, -3.0) for d in (0, 8, -6, 3)],
        "x-w2-happy-1": [neutral] * 4,  # w2 has no neutral clip
    }
    clips = [SimpleNamespace(id=i, identity=i.split("-")[1], landmarks=np.stack(m)) for i, m in meshes.items()]
    motion = SimpleNamespace(index=dict.fromkeys(meshes), reference_mesh=lambda clip: clip.landmarks[0])
    encoder = tiny_model("motion_encoder")
    expression = torch.from_numpy(landmark_offsets(neutral + smile, neutral))
    encoder.fit_landmark_basis(torch.cat([expression[None] * rng.normal(size=(16, 1, 1)).astype(np.float32),
                                          torch.randn(16, 478, 3) * 0.01]))  # fmt: skip

    offsets = expression_offsets(SimpleNamespace(clips=lambda: clips), motion, "x-", encoder)
    assert sorted(offsets) == ["x-m1-happy-1", "x-m1-neutral-1"]
    assert np.allclose(offsets["x-m1-neutral-1"], 0, atol=1e-6)
    latent = torch.from_numpy(offsets["x-m1-happy-1"])[None]
    decoded = encoder.decode_landmark_offsets(latent)[0]
    torch.testing.assert_close(decoded, expression, atol=2e-3, rtol=0)  # the smile, without the pose changes


def test_expression_windows_hold_an_offset_or_ease_into_it_and_the_style_says_which(data_dir, motion_setup):
    args = parse_args(tiny_args(data_dir, motion_setup, "/unused", "--expression_prob", "1", "--expression_ramp", "6"))
    plain_args = parse_args(tiny_args(data_dir, motion_setup, "/unused", "--expression_prob", "0"))
    motion = MotionData(PreparedDataset(data_dir), Path(args.motion_dir), ["talking"], ["nonverbal"], 16)
    offset = np.arange(1, 9, dtype=np.float32)
    moved = MotionWindowDataset(motion, args, num_prev=4, window=12, samples_per_step=2, expressions=[offset])
    plain = MotionWindowDataset(motion, plain_args, num_prev=4, window=12, samples_per_step=2, expressions=[offset])
    kinds = set()
    for index in range(12):
        a, b = moved[index], plain[index]
        style_shift = (a["style_latents"] - b["style_latents"]).numpy()
        scale = style_shift[0, 0]
        assert 0.5 <= scale <= 1.0 and np.allclose(style_shift, scale * offset, atol=1e-5)
        weights = ((a["latents"] - b["latents"]).numpy() / (scale * offset))[:, 0]
        assert weights[-1] == pytest.approx(1.0) and np.all(np.diff(weights) >= -1e-6)
        kinds.add("held" if weights[0] == pytest.approx(1.0) else "eased in")
        if weights[0] != pytest.approx(1.0):
            assert np.all(weights[:4] == 0) and 0 < weights[5] < 1  # the previous frames show none of it
    assert kinds == {"held", "eased in"}


def test_trains_checkpoints_resumes_and_exports_a_complete_pipeline(data_dir, motion_setup, tmp_path):
    main(tiny_args(data_dir, motion_setup, tmp_path))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    pipe = INFPPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.motion_guider is not None and pipe.motion_transformer is not None
    std = pipe.motion_transformer.latent_std
    assert not torch.all(std == 1)  # latent statistics of the training data
    main(tiny_args(data_dir, motion_setup, tmp_path, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    resumed = INFPPipeline.from_pretrained(tmp_path / "pipeline")
    before, after = pipe.motion_transformer.state_dict(), resumed.motion_transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # The renderer is the stage-1 one, unchanged.
    renderer = INFPPipeline.from_pretrained(motion_setup / "renderer")
    for name in ("motion_encoder", "flow_estimator", "face_decoder"):
        ours, theirs = getattr(resumed, name).state_dict(), getattr(renderer, name).state_dict()
        assert all(torch.allclose(ours[k].float(), theirs[k].float(), atol=1e-2) for k in ours)


def test_fine_tuning_starts_from_a_saved_motion_model_and_keeps_new_layers(data_dir, motion_setup, tmp_path):
    main(tiny_args(data_dir, motion_setup, tmp_path / "run"))
    folder = tmp_path / "run" / "pipeline"
    source = INFPPipeline.from_pretrained(folder)
    # A folder saved before a layer was added lacks that layer's weights (here: the own voice's activity cue).
    guider_weights = folder / "motion_guider" / "diffusion_pytorch_model.safetensors"
    state = load_file(guider_weights)
    del state["own_activity"]
    save_file(state, guider_weights)
    model = MotionModel(build_motion_model(parse_args(tiny_args(data_dir, motion_setup, "/unused")), source))
    new_layer = model.motion_guider.own_activity.detach().clone()
    init_from_pipeline(model, str(folder))
    for name in MOTION_MODEL:
        ours, saved = getattr(model, name).state_dict(), getattr(source, name).state_dict()
        for key in ours:
            if key != "own_activity":
                torch.testing.assert_close(ours[key], saved[key].float(), msg=key)
    assert torch.equal(model.motion_guider.own_activity, new_layer)
    with pytest.raises(FileNotFoundError, match="no motion_guider weights"):
        init_from_pipeline(model, str(tmp_path / "empty"))


def test_fine_tuning_can_train_only_the_layers_the_folder_lacks(data_dir, motion_setup, tmp_path):
    main(tiny_args(data_dir, motion_setup, tmp_path / "run"))
    folder = tmp_path / "run" / "pipeline"
    guider_weights = folder / "motion_guider" / "diffusion_pytorch_model.safetensors"
    state = load_file(guider_weights)
    del state["style_to_features.weight"]
    save_file(state, guider_weights)
    tuned_args = ("--init_from", str(folder), "--learning_rate", "0", "--new_layers_learning_rate", "1e-2")
    main(tiny_args(data_dir, motion_setup, tmp_path / "tuned", *tuned_args))
    source, tuned = (INFPPipeline.from_pretrained(p) for p in (folder, tmp_path / "tuned" / "pipeline"))
    for name in MOTION_MODEL:
        ours, theirs = dict(getattr(tuned, name).named_parameters()), dict(getattr(source, name).named_parameters())
        for key in ours:
            if key != "style_to_features.weight":
                assert torch.equal(ours[key], theirs[key]), key
    assert tuned.motion_guider.style_to_features.weight.abs().max() > 0  # zero-initialised, then trained


def test_fine_tuning_can_train_only_the_named_layers(data_dir, motion_setup, tmp_path):
    main(tiny_args(data_dir, motion_setup, tmp_path / "run"))
    folder = tmp_path / "run" / "pipeline"
    tuned_args = ("--init_from", str(folder), "--learning_rate", "1e-2", "--trainable", "motion_guider.verbal_")
    main(tiny_args(data_dir, motion_setup, tmp_path / "tuned", *tuned_args))
    source, tuned = (INFPPipeline.from_pretrained(p) for p in (folder, tmp_path / "tuned" / "pipeline"))
    changed = set()
    for name in MOTION_MODEL:
        ours, theirs = dict(getattr(tuned, name).named_parameters()), dict(getattr(source, name).named_parameters())
        changed |= {f"{name}.{key}" for key in ours if not torch.equal(ours[key], theirs[key])}
    assert changed and all(key.startswith("motion_guider.verbal_") for key in changed), changed
    assert "motion_guider.verbal_bank" in changed
    with pytest.raises(ValueError, match="--trainable motion_guider.verbl: no parameter has that prefix"):
        main(tiny_args(data_dir, motion_setup, tmp_path / "typo", "--trainable", "motion_guider.verbl"))


def test_runs_as_two_processes_with_accelerate(data_dir, motion_setup, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", str(SCRIPT),
               *tiny_args(data_dir, motion_setup, tmp_path, "--max_train_steps", "2")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "pipeline" / "model_index.json").is_file()
