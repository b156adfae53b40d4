"""The stage-2 training script: dyadic windows from one-sided clips, a few steps, resuming, export, 2 processes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline_infp import INFPPipeline
from tests.training.test_prepare_motion import save_tiny_pipeline
from training import prepare_motion
from training.prepared import PreparedDataset
from training.train_motion import (
    MOTION_MODEL,
    MotionData,
    MotionModel,
    MotionWindowDataset,
    build_motion_model,
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


def test_runs_as_two_processes_with_accelerate(data_dir, motion_setup, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", str(SCRIPT),
               *tiny_args(data_dir, motion_setup, tmp_path, "--max_train_steps", "2")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "pipeline" / "model_index.json").is_file()
