"""Packing a prepared dataset for a GPU machine without MediaPipe, and training there on the packed copy."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from training.prepared import PreparedDataset
from training.remote_gpu import main, pack_meshes, unpack_meshes

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "training" / "remote_gpu.py"


@pytest.fixture(scope="module")
def unpacked(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote")
    main(["pack", "--data_dir", str(data_dir), "--out", str(tmp / "packed"), "--every", "2", "--val_frames", "5"])
    main(["unpack", "--packed", str(tmp / "packed"), "--out", str(tmp / "unpacked"), "--workers", "2"])
    return tmp


def test_pack_refuses_to_replace_a_folder_unasked_or_the_data_itself(data_dir, unpacked):
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["pack", "--data_dir", str(data_dir), "--out", str(unpacked / "packed")])
    with pytest.raises(ValueError, match="holds the dataset"):
        main(["pack", "--data_dir", str(data_dir), "--out", str(data_dir.parent), "--overwrite"])
    assert (data_dir / "dataset.json").is_file()


def test_meshes_round_trip_to_a_64th_of_a_pixel():
    rng = np.random.default_rng(0)
    meshes = np.cumsum(rng.normal(0, 2, (30, 478, 3)), axis=0).astype(np.float32) + 128
    assert np.abs(unpack_meshes(pack_meshes(meshes)) - meshes).max() <= 1 / 64 + 1e-4


def test_pack_and_unpack_keep_every_nth_frame_with_its_mesh_and_person_mask(data_dir, unpacked):
    original, copy = PreparedDataset(data_dir), PreparedDataset(unpacked / "unpacked")
    assert copy.size == original.size
    clips = {c.id: c for c in copy.clips()}
    assert {c.id for c in original.clips(kinds=["talking"])} == set(clips)
    for clip in original.clips(kinds=["talking"]):
        keep = np.arange(0, clip.num_frames, 2)
        keep = keep if clip.split == "train" else keep[:5]
        packed = clips[clip.id]
        assert packed.num_frames == len(keep) and packed.split == clip.split
        assert np.abs(np.asarray(packed.landmarks) - np.asarray(clip.landmarks)[keep]).max() <= 1 / 64 + 1e-4
        np.testing.assert_array_equal(packed.matrices, np.asarray(clip.matrices)[keep])
        np.testing.assert_array_equal(packed.indices, np.asarray(clip.indices)[keep])
        masks = np.load(packed.folder / "person.npy")
        assert masks.shape == (len(keep), 64, 64) and masks.dtype == np.uint8
        assert masks[:, 32, 32].min() > 200 and masks[:, 2, 2].max() < 50  # a person in the middle, not the corner
        small = lambda image: cv2.resize(image, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float64)  # noqa: E731
        error = np.mean((small(packed.frame(1)) - small(clip.frame(int(keep[1])))) ** 2)
        assert 10 * np.log10(255**2 / error) > 30  # dB, at the renderer's working size
    portrait = copy.portraits()[0]
    assert (portrait.root / "portraits" / f"{portrait.id}.person.npy").is_file()
    assert (unpacked / "packed" / "site" / "mediapipe" / "python" / "solutions" / "face_mesh_connections.py").is_file()


def run_training(unpacked, output_dir, budget: float, *training_args):
    """The train command in a fresh process that sees only the packed copy's MediaPipe (the topology module), as on
    the GPU machine: running a MediaPipe graph there fails."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(unpacked / "packed" / "site"), str(REPO)]))
    command = [sys.executable, str(SCRIPT), "train", "--time_budget", str(budget), "--", "--data_dir",
               str(unpacked / "unpacked"), "--output_dir", str(output_dir), "--config", "tiny", "--person_prior",
               *training_args]  # fmt: skip
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_training_on_the_unpacked_copy_reads_person_masks_instead_of_running_mediapipe(unpacked, tmp_path):
    # One spawned loader worker: it must take the stored masks too.
    result = run_training(unpacked, tmp_path, 0, "--max_train_steps", "2", "--dataloader_num_workers", "1",
                          "--export_to", str(tmp_path / "renderer"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done: 2 steps" in result.stderr
    waiting = float(re.search(r"([\d.]+) % of the time waiting for the data loader", result.stderr).group(1))
    assert 0 < waiting <= 100  # the first batch always waits for the spawned worker
    for name in ("motion_encoder", "appearance_encoder", "flow_estimator", "face_decoder"):
        with safe_open(tmp_path / "renderer" / name / "diffusion_pytorch_model.safetensors", "pt") as weights:
            assert all(weights.get_tensor(k).dtype.itemsize == 2 for k in list(weights.keys())[:5])
    config = json.loads((tmp_path / "renderer" / "flow_estimator" / "config.json").read_text())
    assert config["person_prior"] is True
    assert (tmp_path / "validation" / "step-000002.jpg").is_file()


def test_a_time_budget_ends_training_early_and_still_exports(unpacked, tmp_path):
    result = run_training(unpacked, tmp_path, 0.01, "--max_train_steps", "100000", "--dataloader_num_workers", "0",
                          "--export_to", str(tmp_path / "renderer"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Time budget of 0 s spent: stopping." in result.stdout
    steps = int(result.stderr.split("Done: ")[1].split(" steps")[0])
    assert steps < 100000
    assert (tmp_path / "renderer" / "face_decoder" / "config.json").is_file()


def test_states_bring_back_every_checkpoint_and_bundle_swaps_one_into_a_pipeline_folder(unpacked, tmp_path):
    run = tmp_path / "run"
    result = run_training(unpacked, run, 0, "--max_train_steps", "4", "--checkpointing_steps", "2",
                          "--checkpoints_total_limit", "5", "--dataloader_num_workers", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    main(["states", "--output_dir", str(run), "--out", str(tmp_path / "states"), "--components", "appearance_encoder"])
    assert sorted(p.name for p in (tmp_path / "states").iterdir()) == [
        "checkpoint-2.safetensors", "checkpoint-4.safetensors"
    ]  # fmt: skip
    state = tmp_path / "states" / "checkpoint-2.safetensors"
    with safe_open(run / "checkpoint-2" / "model.safetensors", "pt") as trained, safe_open(state, "pt") as small:
        assert sorted(small.keys()) == sorted(k for k in trained.keys() if k.startswith("appearance_encoder."))
        for key in small.keys():
            assert small.get_tensor(key).dtype == torch.float16
            assert torch.equal(small.get_tensor(key), trained.get_tensor(key).half())
        assert json.loads(small.metadata()["appearance_encoder"])["_class_name"] == "AppearanceEncoder"

    # The run's last export (step 4) as the base: the bundle takes step 2's appearance encoder, the rest as it was.
    base, bundled = run / "pipeline", tmp_path / "bundled"
    main(["bundle", "--state", str(state), "--base", str(base), "--out", str(bundled)])
    weights = "diffusion_pytorch_model.safetensors"

    def same_as_state(folder: Path) -> bool:
        with safe_open(folder / "appearance_encoder" / weights, "pt") as out, safe_open(state, "pt") as small:
            return all(torch.equal(out.get_tensor(k), small.get_tensor(f"appearance_encoder.{k}")) for k in out.keys())

    assert same_as_state(bundled) and not same_as_state(base)
    for name in ("motion_encoder", "flow_estimator", "face_decoder"):
        assert (bundled / name / weights).read_bytes() == (base / name / weights).read_bytes()
    config = json.loads((bundled / "appearance_encoder" / "config.json").read_text())
    assert "_name_or_path" not in config

    # A state that does not fit its config fails before anything is written.
    broken = tmp_path / "broken.safetensors"
    with safe_open(state, "pt") as small:
        tensors = {k: small.get_tensor(k) for k in list(small.keys())[1:]}
        save_file(tensors, broken, metadata=small.metadata())
    with pytest.raises(RuntimeError, match="Missing key"):
        main(["bundle", "--state", str(broken), "--base", str(base), "--out", str(tmp_path / "half")])
    assert not (tmp_path / "half").exists()
    with pytest.raises(FileExistsError, match="new folder"):
        main(["bundle", "--state", str(state), "--base", str(base), "--out", str(bundled)])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(["states", "--output_dir", str(base), "--out", str(tmp_path / "none")])
