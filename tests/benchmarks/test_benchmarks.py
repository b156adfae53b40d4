"""The benchmark scripts on tiny inputs: they run, time every stage and score what they claim to."""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline_infp import build_pipeline
from tests.utils import randomize

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_times_every_stage(tmp_path):
    pipe = build_pipeline("tiny", seed=0)
    randomize(pipe.motion_transformer, seed=1)
    pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "speed.json"
    result = load("speed").main(["--checkpoint", str(tmp_path / "pipe"), "--seconds", "1", "--steps", "2",
                                 "--size", "64", "--runs", "1", "--warmup", "0", "--dtypes", "fp32",
                                 "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == result
    row = result["results"][0]
    assert row["frames"] == 25
    for stage in ("face crop", "audio encoding", "guide", "motion generation", "rendering", "end to end"):
        assert row["seconds"][stage] > 0
    assert row["fps"]["end to end"] == pytest.approx(25 / row["seconds"]["end to end"], rel=0.01)
    assert row["first frame latency s"] < sum(row["seconds"].values())
    assert 0 < row["streaming first window s"] and row["streaming fps"] > 0
    assert "cpu_threads" in result["machine"]
    assert row["variant"] == "fp32" and row["deviation from fp32"]["latents max"] == 0  # same seed, same video


def test_speed_benchmark_checks_that_fast_paths_keep_the_output(tmp_path):
    pipe = build_pipeline("tiny", seed=0)
    randomize(pipe.motion_transformer, seed=1)
    pipe.save_pretrained(tmp_path / "pipe")
    result = load("speed").main(["--checkpoint", str(tmp_path / "pipe"), "--seconds", "1", "--steps", "2",
                                 "--size", "64", "--runs", "1", "--warmup", "0", "--dtypes", "fp32", "fp16",
                                 "--channels-last"])  # fmt: skip
    exact, half = result["results"]
    assert exact["variant"] == "fp32+channels-last"
    assert exact["deviation from fp32"]["latents max"] < 1e-5 and exact["deviation from fp32"]["pixels mean"] < 0.01
    if "unsupported" not in half:  # fp16 kernels exist for every op on this machine
        assert half["variant"] == "fp16+channels-last"
        assert 0 < half["deviation from fp32"]["pixels mean"] < 5


def test_diarization_scores_against_rttm_turns(tmp_path):
    diarization = load("diarization")
    rttm = tmp_path / "talk.rttm"
    rttm.write_text(
        "SPEAKER talk 1 0.00 1.00 <NA> <NA> anna <NA> <NA>\nSPEAKER talk 1 1.00 1.00 <NA> <NA> ben <NA> <NA>\n"
    )
    activity = diarization.rttm_activity(rttm, 50)
    assert activity[:25, 0].all() and activity[25:, 1].all() and not activity[:25, 1].any()
    perfect = np.r_[np.full(25, 2), np.full(25, 1)]  # cluster names swapped: still perfect
    assert diarization.score(perfect, activity)["accuracy"] == 1.0
    assert diarization.score(np.r_[np.full(25, 1), np.full(25, 1)], activity)["accuracy"] == 0.5


def test_background_motion_is_the_median_flow_where_neither_frame_shows_the_person():
    ceiling = load("renderer_ceiling")
    flow = np.zeros((8, 8, 2), np.float32)
    flow[..., 0] = 3.0  # a pan
    flow[:, :4] = (0.0, 10.0)  # the person moving their own way
    source_person, driving_person = np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32)
    source_person[:, :3], driving_person[:, :4] = 1.0, 1.0
    assert ceiling.background_motion(flow, source_person, driving_person) == pytest.approx(3.0)
    assert np.isnan(ceiling.background_motion(flow, np.ones((8, 8), np.float32), driving_person))


def test_part_affine_flow_moves_each_person_part_by_its_own_affine_and_keeps_the_prior_elsewhere():
    ceiling = load("renderer_ceiling")
    size = 32
    labels = np.full((size, size), 2, np.uint8)  # torso/background
    labels[4:20, 8:24] = 1  # the band around the face mesh
    labels[8:14, 12:20] = 0  # the face mesh: lowest row 13, so band rows 14-19 are the neck
    person = np.zeros((size, size), np.float32)
    person[:, 6:26] = 1.0  # the person: a vertical strip; the rest is background
    ys, xs = np.mgrid[:size, :size].astype(np.float32)
    hair = np.stack([0.1 * xs + 1.0, -0.05 * ys], axis=-1)  # a different affine motion per part
    neck = np.stack([np.full_like(xs, 2.0), 0.2 * xs - 1.0], axis=-1)
    torso = np.stack([-0.1 * ys, np.full_like(xs, 0.5)], axis=-1)
    parts = [((labels == 1) & (ys < 14), hair), ((labels == 1) & (ys >= 14), neck), (labels == 2, torso)]
    oracle = np.full((size, size, 2), -3.0, np.float32)  # inside the face: a motion no part should take
    for part, motion in parts:
        oracle[part] = motion[part]
    prior = np.full((size, size, 2), 7.0, np.float32)
    flow = ceiling.part_affine_flow(prior, oracle, labels, person)
    on_person = person >= 0.5
    for part, motion in parts:
        np.testing.assert_allclose(flow[part & on_person], motion[part & on_person], atol=1e-4)
    kept = (labels == 0) | ~on_person  # the face and the background keep the prior
    np.testing.assert_array_equal(flow[kept], prior[kept])
    # A part too small to fit keeps the prior too.
    few = ceiling.part_affine_flow(prior, oracle, labels, person, min_pixels=10_000)
    np.testing.assert_array_equal(few, prior)


def test_renderer_ceiling_scores_the_oracles_on_the_evaluations_clips(shared_data, tmp_path):
    with open(shared_data / "manifest.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["id"] == "styletalk-feifeili-clip3"]  # a val clip
    with open(tmp_path / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow({**rows[0], "path": str(shared_data / rows[0]["path"])})
    out = tmp_path / "ceiling.json"
    result = load("renderer_ceiling").main(
        ["--manifest", str(tmp_path / "manifest.csv"), "--json", str(out), "--max-frames", "24", "--stride", "8"]
    )
    assert json.loads(out.read_text()) == result
    assert result["clips"]["styletalk-feifeili-clip3"]["frames"] == 3  # driving frames 8, 16, 24
    mean = result["mean"]
    # Resampling through 128² keeps most of a 256² frame; warping by the real flow beats the unchanged source.
    assert mean["working size round trip"]["ssim"] > 0.9 and mean["working size round trip"]["psnr"] > 30
    assert mean["flow oracle"]["ssim"] > mean["static"]["ssim"]
    assert mean["flow oracle"]["psnr"] > mean["static"]["psnr"]
    # The head-only oracle takes the optical flow inside the face and the band around it, the prior elsewhere.
    head, prior = mean["flow oracle on the head"], mean["prior warp"]
    assert head["ssim_face"] > prior["ssim_face"]
    assert head["ssim_elsewhere"] == pytest.approx(prior["ssim_elsewhere"], abs=0.01)
    assert mean["person prior warp"]["ssim_face"] == pytest.approx(prior["ssim_face"], abs=0.01)  # same inside
    assert mean["rigid person prior warp"]["ssim_face"] == pytest.approx(prior["ssim_face"], abs=0.01)
    assert mean["rigid person prior warp"] != mean["person prior warp"]
    # One affine per person part, fitted to the real flow, improves on the rigid prior around the face, not inside.
    parts, rigid = mean["part affine oracle"], mean["rigid person prior warp"]
    assert parts["ssim_around"] > rigid["ssim_around"] and parts["ssim"] > rigid["ssim"]
    assert parts["ssim_face"] == pytest.approx(rigid["ssim_face"], abs=0.01)
    # The person oracle takes the optical flow wherever the real frame shows the person: the face among it.
    assert mean["flow oracle on the person"]["ssim_face"] == pytest.approx(mean["flow oracle"]["ssim_face"], abs=0.01)
    # A still camera: about a pixel of optical-flow noise (the val clips that pan or follow the face: 5-12 px).
    assert 0 <= result["clips"]["styletalk-feifeili-clip3"]["background_motion"] < 3
    assert set(mean["static"]) == {"ssim", "psnr", "ssim_face", "ssim_around", "ssim_elsewhere"}
