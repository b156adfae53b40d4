"""The stage-1 training script: data pairs, a few steps in one and in two processes, resuming, export."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from pipeline_infp import INFPPipeline
from pipeline_infp.processing import FaceProcessor
from pipeline_infp.processing.face import mouth_aperture
from training.prepared import PreparedDataset
from training.train_head_imitation import (
    RENDERER,
    HeadImitationDataset,
    Renderer,
    closing_frames,
    has_real_frame,
    main,
    make_loader,
    mean_over,
    optical_flow,
    reframe,
    render_batch,
    synthetic_driving,
    teacher_loss,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "training" / "train_head_imitation.py"


def tiny_args(data_dir, output_dir, *extra):
    return ["--data_dir", str(data_dir), "--output_dir", str(output_dir), "--config", "tiny",
            "--dataloader_num_workers", "0", *extra]  # fmt: skip


def test_pairs_have_images_hybrids_and_mesh_flow(data_dir):
    dataset = HeadImitationDataset(
        PreparedDataset(data_dir), ["talking"], "train", resolution=64, portrait_pair_prob=0.5, seed=0, length=10,
        with_optical_flow=True,
    )  # fmt: skip
    sample = dataset[3]
    assert sample["source"].shape == sample["driving"].shape == (3, 64, 64)
    assert sample["driving_hybrid"].shape == (3, 256, 256)
    assert sample["mesh_flow"].shape == sample["prior_flow"].shape == (2, 64, 64)
    assert sample["mesh_mask"].shape == sample["valid"].shape == sample["optical_mask"].shape == (1, 64, 64)
    assert sample["optical_flow"].shape == (2, 64, 64) and sample["optical_mask"].mean() > 0.5
    assert sample["driving_offsets"].shape == (478, 3)
    assert 0 < sample["mesh_mask"].mean() < 1 and sample["valid"].mean() > 0.8
    # Without a basis the prior is the exact mesh flow inside the mesh.
    inside = sample["mesh_mask"].expand(2, -1, -1) > 0
    torch.testing.assert_close(sample["prior_flow"][inside], sample["mesh_flow"][inside])
    assert -1 <= sample["source"].min() and sample["source"].max() <= 1
    again = dataset[3]
    assert all(torch.equal(sample[k], again[k]) for k in sample)  # a pair is a function of its index
    assert not torch.equal(dataset[4]["driving"], sample["driving"])
    # The optical flow target is computed only when asked for, and asking for it changes nothing else.
    plain = HeadImitationDataset(
        PreparedDataset(data_dir), ["talking"], "train", resolution=64, portrait_pair_prob=0.5, seed=0, length=10
    )[3]
    assert set(sample) - set(plain) == {"optical_flow", "optical_mask"}
    assert all(torch.equal(sample[k], plain[k]) for k in plain)
    # The person prior changes the prior flow outside the face mesh and nothing else.
    dataset.person_prior = True
    person = dataset[3]
    assert all(torch.equal(sample[k], person[k]) for k in sample if k != "prior_flow")
    inside = sample["mesh_mask"].expand(2, -1, -1) > 0
    assert torch.equal(person["prior_flow"][inside], sample["prior_flow"][inside])
    assert not torch.equal(person["prior_flow"], sample["prior_flow"])
    # ... as does its rigid head motion.
    dataset.head_motion = "rigid"
    rigid = dataset[3]
    assert all(torch.equal(person[k], rigid[k]) for k in person if k != "prior_flow")
    assert torch.equal(rigid["prior_flow"][inside], sample["prior_flow"][inside])
    assert not torch.equal(rigid["prior_flow"], person["prior_flow"])
    dataset.head_motion = "affine"
    # The face decoder's warp lock comes with the pair, of the same mesh as the prior, and changes nothing else.
    dataset.person_prior, dataset.warp_lock_margin = False, 0.1
    locked = dataset[3]
    assert set(locked) - set(sample) == {"warp_lock"} and all(torch.equal(sample[k], locked[k]) for k in sample)
    assert locked["warp_lock"].shape == (1, 64, 64)
    assert locked["warp_lock"][sample["mesh_mask"] > 0].mean() > 0.9 and locked["warp_lock"].mean() < 0.7


def test_pairs_use_the_motion_encoders_basis_for_the_prior(data_dir):
    dataset = HeadImitationDataset(
        PreparedDataset(data_dir), ["talking"], "train", resolution=64, portrait_pair_prob=0.0, seed=0, length=10
    )
    exact = dataset[1]
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(478 * 3, 2)))[0].T.astype(np.float32)
    dataset.landmark_basis = basis
    projected = dataset[1]
    assert torch.equal(exact["driving"], projected["driving"])
    assert not torch.allclose(exact["prior_flow"], projected["prior_flow"])


def test_closing_pairs_go_from_a_wide_open_mouth_to_closed_lips(data_dir):
    data = PreparedDataset(data_dir)
    clips = data.clips(kinds=["talking"], splits=["train"])
    [(clip, opened, closed)] = closing_frames(clips)
    gap = mouth_aperture(np.asarray(clip.landmarks))
    assert len(opened) and len(closed) and gap[opened].min() > 0.2 and gap[closed].max() < 0.03
    assert closing_frames(clips, open_above=gap.max()) == []  # no wide-open frame: no closing pairs

    dataset = HeadImitationDataset(
        data, ["talking"], "train", resolution=64, portrait_pair_prob=0.0, seed=0, length=10, closing_pair_prob=1.0
    )
    for index in range(4):
        offsets = dataset[index]["driving_offsets"].numpy()  # inter-ocular distances, driving − source
        assert offsets[14, 1] - offsets[13, 1] < -0.15  # the lower lip rises to meet the upper one
    plain = HeadImitationDataset(data, ["talking"], "train", resolution=64, portrait_pair_prob=0.0, seed=0, length=10)
    gaps = [plain[i]["driving_offsets"][14, 1] - plain[i]["driving_offsets"][13, 1] for i in range(8)]
    assert plain.closing == [] and max(gaps) > -0.15  # ordinary pairs: not all closing


def test_cross_identity_pairs_have_no_target_but_the_lips_for_the_teacher(data_dir):
    data = PreparedDataset(data_dir)
    plain = HeadImitationDataset(data, ["talking"], "train", resolution=64, portrait_pair_prob=0.0, seed=0, length=10)
    cross = HeadImitationDataset(
        data, ["talking"], "train", resolution=64, portrait_pair_prob=0.0, seed=0, length=40, teacher_pair_prob=1.0
    )
    assert "teacher_mask" not in plain[0]  # runs without a teacher keep their pairs as they were
    still = moved = 0
    for index in range(40):
        sample = cross[index]
        lips = sample["teacher_mask"][0]
        assert sample["valid"].max() == 0  # no real target: the reconstruction losses ignore the pair
        assert 0.002 < lips.mean() < 0.2 and set(lips.unique().tolist()) <= {0.0, 1.0}
        if torch.equal(sample["driving_hybrid"], sample["source_hybrid"]):  # held still, as a portrait at rest
            still += 1
            assert sample["driving_offsets"].abs().max() == 0
        else:  # another frame's eyes and lips drive it
            moved += 1
    assert 3 < still < 20 and moved > 20
    mixed = HeadImitationDataset(
        data, ["talking"], "train", resolution=64, portrait_pair_prob=0.0, seed=0, length=10, teacher_pair_prob=0.5
    )
    masks = [mixed[i]["teacher_mask"].max().item() for i in range(10)]
    assert 0 < sum(masks) < 10  # ordinary pairs carry an empty mask, so batches stack

    # With portrait pairs on, half the cross-identity pairs move a portrait, as the pipeline does.
    with_portraits = HeadImitationDataset(
        data, ["talking"], "train", resolution=64, portrait_pair_prob=0.2, seed=0, length=40, teacher_pair_prob=1.0
    )
    [portrait] = with_portraits.portraits
    drawn = []

    class CountedPortrait:
        landmarks = portrait.landmarks

        def image(self):
            drawn.append(1)
            return portrait.image()

    with_portraits.portraits = [CountedPortrait()]
    assert all(with_portraits[i]["valid"].max() == 0 for i in range(20)) and 4 < len(drawn) < 16
    # `--teacher_sources frames` (the released renderer's fine-tune) moves training frames only.
    frames_only = HeadImitationDataset(
        data, ["talking"], "train", resolution=64, portrait_pair_prob=0.2, seed=0, length=40, teacher_pair_prob=1.0,
        teacher_from_portraits=False,
    )  # fmt: skip
    frames_only.portraits = [CountedPortrait()]
    drawn.clear()
    assert all(frames_only[i]["valid"].max() == 0 for i in range(20)) and not drawn


def test_teacher_loss_is_zero_for_the_teacher_itself_and_without_cross_identity_pairs(data_dir, tmp_path):
    main(tiny_args(data_dir, tmp_path / "first", "--max_train_steps", "2"))
    pipe = INFPPipeline.from_pretrained(tmp_path / "first" / "pipeline")
    renderer = Renderer({name: getattr(pipe, name) for name in RENDERER})
    cross = HeadImitationDataset(
        PreparedDataset(data_dir), ["talking"], "train", resolution=64, portrait_pair_prob=0.0, seed=0, length=4,
        teacher_pair_prob=0.5,
    )  # fmt: skip
    cross.landmark_basis = pipe.motion_encoder.landmark_basis.numpy()
    batch = {k: torch.stack([cross[i][k] for i in range(4)]) for k in cross[0]}
    assert 0 < (batch["teacher_mask"].flatten(1).amax(1) > 0).sum() < 4
    output = render_batch(renderer, batch)[0].sample
    assert teacher_loss(renderer, batch, output).item() == pytest.approx(0.0, abs=1e-6)
    other = copy.deepcopy(renderer)
    with torch.no_grad():
        for parameter in other.face_decoder.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    assert teacher_loss(other, batch, output).item() > 1e-3
    batch["teacher_mask"] = torch.zeros_like(batch["teacher_mask"])
    none = teacher_loss(other, batch, output)
    assert none.item() == 0 and none.requires_grad  # in the graph, as every process's backward must be


def test_adversarial_losses_leave_out_pairs_without_a_real_frame():
    valid = torch.ones(3, 1, 4, 4)
    valid[1] = 0  # a cross-identity pair: its "real" frame would be the output itself
    real = has_real_frame({"valid": valid})
    assert real.tolist() == [1.0, 0.0, 1.0]
    values = torch.arange(3 * 2 * 2, dtype=torch.float32).reshape(3, 1, 2, 2)
    assert mean_over(real, values).item() == pytest.approx((values[0].mean() + values[2].mean()).item() / 2)
    assert mean_over(torch.ones(3), values).item() == pytest.approx(values.mean().item())  # as before, without them
    assert mean_over(torch.zeros(3), values).item() == 0


def test_reframe_moves_a_driving_crop_into_the_source_crop(data_dir):
    clip = PreparedDataset(data_dir).clips(kinds=["talking"])[0]
    frame, landmarks = clip.frame(5), np.array(clip.landmarks[5])
    same, same_lm, valid = reframe(frame, landmarks, clip.matrices[5], clip.matrices[5])
    assert np.abs(same.astype(int) - frame).max() <= 1 and np.allclose(same_lm, landmarks, atol=1e-4)
    assert valid[2:-2, 2:-2].min() == 255 and valid.mean() > 0.95 * 255
    # A crop shifted by 20 px: the content moves back by 20 px and the uncovered border is invalid.
    shifted = clip.matrices[5].copy()
    shifted[0, 2] += 20
    moved, moved_lm, valid = reframe(frame, landmarks, clip.matrices[5], shifted)
    np.testing.assert_allclose(moved_lm[:, 0], landmarks[:, 0] + 20, atol=1e-3)
    assert np.abs(moved[:, 30:].astype(int) - frame[:, 10:-20]).mean() < 1
    assert valid[:, :18].max() == 0 and valid[:, 30:].min() == 255


def test_synthetic_driving_moves_the_face_where_its_landmarks_say(shared_data):
    with FaceProcessor() as processor:
        face = processor.crop_portrait(shared_data / "portraits" / "liveportrait-source-s1.jpg")
        moved, target = synthetic_driving(face.image, face.landmarks, np.random.default_rng(1))
        found = processor.landmarks(moved)
    assert moved.shape == face.image.shape and not np.array_equal(moved, face.image)
    error = np.linalg.norm(found[:468, :2] - target[:468, :2], axis=1).mean()
    assert error < 0.03 * face.image.shape[0]


def test_optical_flow_finds_a_known_motion_and_masks_what_left_the_frame(shared_data):
    image = cv2.imread(str(shared_data / "portraits" / "liveportrait-source-s1.jpg"))
    source = cv2.cvtColor(cv2.resize(image, (128, 128), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
    shift = 4  # the driving frame shows the source moved 4 px right: its pixel x comes from source x - 4
    driving = cv2.warpAffine(source, np.float32([[1, 0, shift], [0, 1, 0]]), (128, 128), borderMode=cv2.BORDER_REFLECT)
    flow, mask = optical_flow(source, driving)
    assert flow.shape == (2, 128, 128) and mask.shape == (128, 128)
    inner = mask[:, 16:-16] > 0
    assert inner.mean() > 0.8
    np.testing.assert_allclose(np.median(flow[0][:, 16:-16][inner]) * 128 / 2, -shift, atol=0.25)
    np.testing.assert_allclose(np.median(flow[1][:, 16:-16][inner]) * 128 / 2, 0, atol=0.25)
    assert mask[:, :shift].mean() < 0.5  # driving pixels whose content is not in the source


class OpenCVThreads(Dataset):
    """What OpenCV's pool is in the process that makes each sample."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return cv2.getNumThreads()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenCV's default pool is one thread on one core")
@pytest.mark.parametrize("spawn", [True, False])
def test_loader_workers_run_opencv_on_one_thread(spawn):
    threads = [int(t) for batch in make_loader(OpenCVThreads(), 1, num_workers=1, spawn=spawn) for t in batch]
    assert threads == [1, 1]


def test_trains_checkpoints_validates_resumes_and_exports(data_dir, tmp_path):
    main(tiny_args(data_dir, tmp_path))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (tmp_path / "validation" / "step-000004.jpg").is_file()
    pipe = INFPPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.motion_guider is None
    basis = pipe.motion_encoder.landmark_basis.float()  # fitted on the data before training
    torch.testing.assert_close(basis @ basis.T, torch.eye(len(basis)), atol=1e-2, rtol=0)
    with safe_open(tmp_path / "pipeline" / "face_decoder" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert all(weights.get_tensor(key).dtype == torch.float16 for key in weights.keys())  # noqa: SIM118

    main(tiny_args(data_dir, tmp_path, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    resumed = INFPPipeline.from_pretrained(tmp_path / "pipeline")
    before, after = pipe.face_decoder.state_dict(), resumed.face_decoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_fine_tuning_with_a_frozen_motion_encoder_keeps_its_latents(data_dir, tmp_path):
    main(tiny_args(data_dir, tmp_path / "first", "--max_train_steps", "2"))
    first = tmp_path / "first" / "pipeline"
    main(tiny_args(data_dir, tmp_path / "tuned", "--init_from", str(first), "--freeze", "motion_encoder",
                   "--learning_rate", "1e-2", "--max_train_steps", "2", "--optical_flow_weight", "1",
                   "--person_prior", "--head_motion", "rigid", "--warp_lock_margin", "0.1",
                   "--teacher_pair_prob", "0.5", "--teacher_sources", "frames", "--gan_start_step", "0",
                   "--dataloader_num_workers", "1",
                   "--resolution", "96"))  # fmt: skip
    before, after = INFPPipeline.from_pretrained(first), INFPPipeline.from_pretrained(tmp_path / "tuned" / "pipeline")
    # Images larger than the checkpoint's working size train it at that size: its working size stays.
    assert after.appearance_encoder.config.sample_size == before.appearance_encoder.config.sample_size == 64
    # Fine-tuned onto the person prior (its loader workers spawned, as MediaPipe needs): the pipeline will use it.
    assert not before.flow_estimator.config.person_prior and after.flow_estimator.config.person_prior
    assert before.flow_estimator.config.head_motion == "affine" and after.flow_estimator.config.head_motion == "rigid"
    assert before.face_decoder.config.warp_lock_margin is None and after.face_decoder.config.warp_lock_margin == 0.1
    kept, tuned = before.motion_encoder.state_dict(), after.motion_encoder.state_dict()
    assert kept.keys() == tuned.keys() and all(torch.equal(kept[k], tuned[k]) for k in kept)
    decoder_before, decoder_after = before.face_decoder.state_dict(), after.face_decoder.state_dict()
    assert any(not torch.equal(decoder_before[k], decoder_after[k]) for k in decoder_before)

    with pytest.raises(ValueError, match="leaves nothing to train"):
        main(tiny_args(data_dir, tmp_path / "none", "--freeze", *RENDERER))


def test_runs_as_two_processes_with_accelerate(data_dir, tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", str(SCRIPT),
               *tiny_args(data_dir, tmp_path, "--max_train_steps", "2")]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 x 2 processes" in result.stderr
    assert torch.cuda.is_available() or "DistributedType.MULTI_CPU" in result.stderr
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "pipeline" / "model_index.json").is_file()
