"""Evaluation: image metrics, manifest handling, streaming tracking and an end-to-end `reenactment` run."""

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from pipeline_infp import build_pipeline, metrics
from pipeline_infp.evaluate import (
    AROUND,
    REGIONS,
    Entry,
    face_regions,
    format_table,
    l1,
    landmark_distances,
    main,
    motion_fidelity,
    pearson,
    psnr,
    region_ssim,
    select_clips,
    sharpness,
    spread,
    ssim,
    ssim_maps,
    track_clip,
)
from pipeline_infp.motion_features import MotionFeatureSpace
from pipeline_infp.processing import FaceProcessor, apply_matrix, read_video

C1, C2 = 0.01**2, 0.03**2
CLIP = "styletalk-feifeili-clip3"  # val, 256x256, 30 fps
PORTRAIT = "liveportrait-source-s1"


def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """skimage's structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1) written out with scipy: float64 [H, W, C] in [0, 1], channels averaged."""
    values = []
    for c in range(x.shape[2]):
        a, b = x[..., c], y[..., c]

        def blur(z):
            return gaussian_filter(z, 1.5, truncate=3.5, mode="reflect")  # radius 5: an 11-tap window

        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + C1) * (2 * cov + C2)) / ((mu_a**2 + mu_b**2 + C1) * (var_a + var_b + C2))
        values.append(s[5:-5, 5:-5].mean())  # skimage crops the borders the window does not fit
    return float(np.mean(values))


def _images(seed=0, shape=(3, 48, 40, 3)):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, shape, dtype=np.uint8)
    noisy = np.clip(base.astype(int) + rng.integers(-50, 50, shape), 0, 255).astype(np.uint8)
    return base, noisy


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).double().div(255)


# --------------------------------------------------------------------------- SSIM, PSNR, L1


@pytest.mark.parametrize("as_float", [False, True])
def test_ssim_identical_is_one_and_symmetric(as_float):
    x, y = _images()
    if as_float:
        x, y = x / 255.0, y / 255.0
    np.testing.assert_allclose(ssim(x, x), 1.0, atol=1e-6)
    np.testing.assert_allclose(ssim(x, y), ssim(y, x), atol=1e-6)
    assert ssim(x, y).shape == (3,) and (ssim(x, y) < 0.97).all()
    np.testing.assert_allclose(ssim(x[0], y[0]), ssim(x, y)[:1], atol=1e-6)  # a single image is a batch of one


def test_ssim_matches_the_skimage_formula():
    x, y = _images(seed=1, shape=(2, 37, 52, 3))
    expected = [_reference_ssim(a.astype(np.float64) / 255, b.astype(np.float64) / 255) for a, b in zip(x, y)]
    np.testing.assert_allclose(ssim(x, y), expected, atol=2e-6)


def test_ssim_of_constant_images_by_hand():
    # Constant images: every variance is 0, so SSIM = (2ab + C1) / (a² + b² + C1).
    a, b = 0.3, 0.5
    x, y = np.full((1, 16, 16, 3), a), np.full((1, 16, 16, 3), b)
    assert ssim(x, y)[0] == pytest.approx((2 * a * b + C1) / (a * a + b * b + C1), abs=1e-6)


def test_ssim_one_window_by_hand():
    # An 11x11 image holds exactly one window position: compute that window's SSIM with explicit weights.
    rng = np.random.default_rng(3)
    x, y = rng.random((11, 11)), rng.random((11, 11))
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy, cxy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum(), (w * (x - mx) * (y - my)).sum()
    expected = ((2 * mx * my + C1) * (2 * cxy + C2)) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    assert ssim(x[None, :, :, None], y[None, :, :, None])[0] == pytest.approx(expected, abs=1e-6)


def test_a_brightness_shift_lowers_ssim_by_the_luminance_term_only():
    rng = np.random.default_rng(4)
    x = gaussian_filter(rng.random((40, 40)), 2) * 0.6 + 0.1  # smooth, stays in [0, 1] after the shift
    shift = 0.15
    got = ssim(x[None, :, :, None], (x + shift)[None, :, :, None])[0]
    # Same variances and covariance = variance: the contrast-structure term is 1, only luminance remains.
    mu = gaussian_filter(x, 1.5, truncate=3.5)[5:-5, 5:-5]
    expected = ((2 * mu * (mu + shift) + C1) / (mu**2 + (mu + shift) ** 2 + C1)).mean()
    assert got < 0.99 and got == pytest.approx(expected, abs=1e-5)


def test_ssim_maps_average_to_ssim_and_regions_weighted_by_their_counts_too():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, size=(2, 40, 48, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, size=x.shape), 0, 255).astype(np.uint8)
    maps = ssim_maps(x, y)
    assert maps.shape == (2, 30, 38)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), ssim(x, y), atol=1e-9)
    labels = rng.integers(0, 2, size=(2, 40, 48)).astype(np.uint8)  # no "elsewhere" pixel
    labels[0, 20, 24] = 2  # one, at a window centre of the first image
    means, counts = region_ssim(maps, labels)
    assert counts.sum(axis=1).tolist() == [30 * 38] * 2 and counts[:, 2].tolist() == [1, 0]
    assert means[0, 2] == pytest.approx(maps[0, 15, 19]) and np.isnan(means[1, 2])
    weighted = np.nansum(means * counts, axis=1) / counts.sum(axis=1)
    np.testing.assert_allclose(weighted, ssim(x, y), atol=1e-9)


def test_face_regions_follow_the_face_mesh(shared_data):
    with FaceProcessor() as processor:
        crop = processor.crop_portrait(shared_data / "portraits" / f"{PORTRAIT}.jpg", size=256)
    labels = face_regions(crop.landmarks, 256)
    assert labels.shape == (256, 256) and set(np.unique(labels)) == {0, 1, 2}
    nose, forehead = crop.landmarks[1, :2].round().astype(int), crop.landmarks[10, :2]
    assert labels[nose[1], nose[0]] == 0
    above = (forehead + [0, -AROUND * 256 / 2]).round().astype(int)  # half the band above the mesh's top
    assert labels[above[1], above[0]] == 1
    assert labels[0, 0] == labels[255, 255] == 2  # the crop is 1.8x the face: its corners are far from it
    area = np.bincount(labels.ravel(), minlength=len(REGIONS)) / labels.size
    assert 0.1 < area[0] < 0.5 and 0.1 < area[1] < 0.5


def test_landmark_distances_in_inter_ocular_units(shared_data):
    with FaceProcessor() as processor:
        real = processor.crop_portrait(shared_data / "portraits" / f"{PORTRAIT}.jpg", size=256).landmarks
    assert landmark_distances(real, real) == (0.0, 0.0)
    inter_ocular = np.linalg.norm(real[33, :2] - real[263, :2])
    moved = real.copy()
    moved[:, 0] += 0.1 * inter_ocular  # the whole head a tenth of the eye distance to the right
    np.testing.assert_allclose(landmark_distances(moved, real), (0.1, 0.1), rtol=1e-5)
    opened = real.copy()
    opened[14, 1] += inter_ocular  # only the lower inner lip's middle point, one eye distance down
    face, mouth = landmark_distances(opened, real)
    assert face == pytest.approx(1 / 468) and mouth > 10 * face
    assert landmark_distances(2 * opened, 2 * real) == pytest.approx((face, mouth))  # the crop size cancels


def test_metrics_agree_with_the_shared_torch_metrics(shared_data):
    # pipeline_infp.metrics holds the differentiable versions training uses: the evaluation must report the same.
    frames, _ = read_video(shared_data / "video" / f"{CLIP}.mp4", max_frames=12)
    x, y = frames[:4], frames[8:12]
    np.testing.assert_allclose(ssim(x, y), metrics.ssim(_tensor(x), _tensor(y)).numpy(), atol=1e-6)
    np.testing.assert_allclose(psnr(x, y), metrics.psnr(_tensor(x), _tensor(y)).numpy(), atol=1e-6)
    assert psnr(x, x).tolist() == pytest.approx(metrics.psnr(_tensor(x), _tensor(x)).tolist())


def test_ssim_rejects_mismatched_or_tiny_images():
    with pytest.raises(ValueError, match="same shape"):
        ssim(np.zeros((1, 20, 20, 3), np.uint8), np.zeros((1, 20, 21, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="uint8"):
        psnr(np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8, 3)))


def test_psnr_and_l1():
    x = np.zeros((2, 16, 16, 3), np.uint8)
    y = np.full((2, 16, 16, 3), 51, np.uint8)  # 0.2 everywhere
    assert psnr(x, y) == pytest.approx([10 * np.log10(1 / 0.04)] * 2, abs=1e-9)  # 13.98 dB
    assert l1(x, y) == pytest.approx([0.2, 0.2], abs=1e-12)
    assert psnr(x, x).tolist() == [100.0, 100.0]  # identical: capped, not inf
    assert l1(y / 255.0, x / 255.0) == pytest.approx([0.2, 0.2], abs=1e-12)
    assert psnr(y / 255.0, x / 255.0) == pytest.approx(psnr(x, y), abs=1e-9)


def test_sharpness_is_one_for_the_same_detail_and_falls_with_blur():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert sharpness(real, real) == pytest.approx([1.0, 1.0])
    assert sharpness(real / 255.0, real / 255.0) == pytest.approx([1.0, 1.0])  # floats in [0, 1] alike
    blurred = np.stack([cv2.GaussianBlur(x, (0, 0), 1.2) for x in real])
    assert (sharpness(blurred, real) < 0.2).all() and (sharpness(real, blurred) > 5).all()
    assert sharpness(real[::-1], real) == pytest.approx(sharpness(real, real[::-1]) ** -1)
    flat = np.full((1, 32, 32, 3), 128, np.uint8)
    assert np.isnan(sharpness(real[:1], flat)).all() and sharpness(flat, real[:1]) == pytest.approx([0.0])


def test_pearson_is_zero_for_constant_series():
    t = np.arange(10.0)
    assert pearson(t, 2 * t + 1) == pytest.approx(1.0)
    assert pearson(t, -t) == pytest.approx(-1.0)
    assert pearson(t, np.ones(10)) == 0.0 and pearson(t[:2], t[:2]) == 0.0


# --------------------------------------------------------------------------- manifest and streaming


def test_clip_selection_falls_back_to_every_talking_clip(tmp_path):
    def entry(id, kind, split=""):
        return Entry(id, tmp_path / id, kind, split)

    with_split = [entry("a", "talking", "train"), entry("b", "talking", "val"), entry("p", "portrait", "train")]
    assert [e.id for e in select_clips(with_split)[0]] == ["b"]
    no_split = [entry("a", "talking"), entry("b", "talking"), entry("p", "portrait")]
    assert [e.id for e in select_clips(no_split)[0]] == ["a", "b"]


def test_portrait_subset_is_spread_over_the_list():
    items = list(range(22))
    assert spread(items, 12) == [0, 2, 4, 6, 8, 10, 11, 13, 15, 17, 19, 21]
    assert spread(items, None) == items and spread(items, 40) == items and spread(items, 0) == []
    assert spread(items, 1) == [0]


def test_streamed_tracking_matches_read_video_and_track_video(shared_data):
    path = shared_data / "video" / f"{CLIP}.mp4"
    frames, _ = read_video(path, max_frames=9)
    with FaceProcessor() as processor:
        expected = processor.track_video(frames, size=128)
        track = track_clip(processor, path, size=128, max_frames=9)
    np.testing.assert_array_equal(track.indices, expected.indices)
    np.testing.assert_allclose(track.landmarks, expected.landmarks, atol=1e-4)
    np.testing.assert_allclose(track.matrices, expected.matrices, atol=1e-9)


def test_fixed_crop_track_cuts_every_frame_with_the_first_frames_crop(shared_data):
    with FaceProcessor() as processor:
        track = track_clip(processor, shared_data / "video" / f"{CLIP}.mp4", size=128, max_frames=5)
    fixed = track.fixed()
    assert np.all(fixed.matrices == track.matrices[0]) and np.array_equal(fixed.indices, track.indices)
    np.testing.assert_allclose(fixed.landmarks[0], track.landmarks[0], atol=1e-4)
    # Frame 4's landmarks, mapped back to the video frame, are where tracking found them.
    frame_pts = lambda pts, m: apply_matrix(pts, cv2.invertAffineTransform(m))  # noqa: E731
    np.testing.assert_allclose(
        frame_pts(fixed.landmarks[4], fixed.matrices[4])[:, :2],
        frame_pts(track.landmarks[4], track.matrices[4])[:, :2],
        atol=1e-3,
    )


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def evaluation(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    build_pipeline("tiny").save_pretrained(tmp / "pipe")
    with FaceProcessor() as processor:  # the FD columns' feature space, as `evaluate motion` saves it
        track = track_clip(processor, shared_data / "video" / f"{CLIP}.mp4", max_frames=20)
    MotionFeatureSpace.fit([track.landmarks], components=4).save(tmp / "pipe" / "motion_features.npz")
    with open(shared_data / "manifest.csv", newline="") as handle:
        rows = {row["id"]: row for row in csv.DictReader(handle)}
    Image.new("RGB", (96, 96), (128, 128, 128)).save(tmp / "blank.png")  # a "portrait" without a face
    blank = {**rows[PORTRAIT], "id": "blank", "path": str(tmp / "blank.png")}
    selected = [rows[CLIP], rows["styletalk-obama-clip1"], rows[PORTRAIT], blank]  # obama-clip1 is train
    with open(tmp / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[CLIP]))
        writer.writeheader()
        for row in selected:
            path = row["path"] if row["id"] == "blank" else str(shared_data / row["path"])
            writer.writerow({**row, "path": path})
    out = tmp / "eval.json"
    returned = main(
        ["reenactment", "--manifest", str(tmp / "manifest.csv"), "--checkpoint", str(tmp / "pipe"),
         "--json", str(out), "--max-frames", "10", "--cross-frames", "5", "--batch-size", "4", "--no-progress"]
    )  # fmt: skip
    return returned, json.loads(out.read_text()), tmp


def test_evaluation_json_structure(evaluation):
    returned, results, tmp = evaluation
    assert returned == results
    assert results["command"] == "reenactment"
    assert results["manifest"] == str((tmp / "manifest.csv").resolve())
    assert results["checkpoint"] == str((tmp / "pipe").resolve())
    assert results["settings"]["max_frames"] == 10 and results["settings"]["size"] == 256
    assert results["settings"]["motion_features"] == str((tmp / "pipe" / "motion_features.npz").resolve())
    assert results["settings"]["crop"] == "fixed"
    assert {"platform", "cpu_count", "torch", "device"} <= set(results["machine"])
    assert results["wall_time_s"] > 0 and results["timings_s"]["self: face tracking"] > 0
    for method in ("static", "mesh warp", "prior warp", "renderer"):
        assert method in results["table"]
    check = results["checks"]["renderer_face_found"]
    assert check["min"] == 0.99 and check["ok"] == (check["value"] >= 0.99)

    [clip] = results["self_reenactment"]  # only the val clip
    assert clip["id"] == CLIP and clip["driving_frames"] == 10 and clip["frames_read"] == 11
    assert len(clip["per_frame"]["frame_index"]) == 10
    for method in ("static", "mesh warp", "prior warp", "renderer"):
        metrics = clip["methods"][method]
        assert 0 < metrics["ssim"] <= 1 and metrics["psnr"] > 10 and 0 <= metrics["l1"] < 0.5
        assert 0.05 < metrics["sharpness"] < 20 and len(clip["per_frame"][method]["sharpness"]) == 10
        assert results["summary"][method]["sharpness"] == pytest.approx(metrics["sharpness"], abs=1e-5)
        assert len(clip["per_frame"][method]["ssim"]) == 10
        assert np.mean(clip["per_frame"][method]["psnr"]) == pytest.approx(metrics["psnr"], abs=1e-3)
        for region in REGIONS:  # every region is present in these frames
            assert len(clip["per_frame"][method][f"ssim_{region}"]) == 10 and 0 < metrics[f"ssim_{region}"] <= 1
        summary = results["summary"][method]
        assert summary["ssim"] == pytest.approx(metrics["ssim"], abs=1e-5) and summary["clips"] == 1
        assert summary["ssim_face"] == pytest.approx(metrics["ssim_face"], abs=1e-5)
    assert sum(clip["region_area"].values()) == pytest.approx(1) and "SSIM around" in results["table"]
    # Landmark distances on every 5th driving frame: of the 10 here, the 5th and 10th (the source is frame 0).
    lmd = clip["landmark_distances"]
    assert lmd["frame_index"] == clip["per_frame"]["frame_index"][4::5] and "LMD mouth" in results["table"]
    for method in ("static", "mesh warp", "prior warp", "renderer"):
        assert len(lmd[method]["lmd_face"]) == 2 and 0 < clip["methods"][method]["lmd_face"] < 1
        assert results["summary"][method]["lmd_mouth"] == pytest.approx(clip["methods"][method]["lmd_mouth"], abs=1e-5)
        # FD on those frames' motion features: a whole never closer than its pose or expression part.
        fd = results["summary"][method]
        assert 0 <= fd["fd_pose"] <= fd["fd"] + 1e-6 and 0 <= fd["fd_expression"] <= fd["fd"] + 1e-6
    assert "FD expr" in results["table"] and "pose = the first 6 features" in results["table"]
    assert "sharpness" in results["table"]

    [pair] = results["cross_identity"]  # the blank portrait is skipped, not fatal
    assert [p["id"] for p in results["skipped"]["portraits"]] == ["blank"] and results["portraits"] == [PORTRAIT]
    assert results["clips"] == [CLIP]
    assert pair["portrait"] == PORTRAIT and pair["clip"] == CLIP and pair["frames"] == 5
    assert len(pair["driver"]["mouth"]) == 5
    for method in ("static", "mesh warp", "prior warp", "renderer"):
        scores = pair["methods"][method]
        assert -1 <= scores["mouth_corr"] <= 1 and -1 <= scores["eye_corr"] <= 1 and 0 <= scores["face_found"] <= 1
    # static: one unchanging frame, so its series are constant and count as uncorrelated.
    assert pair["methods"]["static"]["mouth_corr"] == 0 and pair["methods"]["static"]["face_found"] == 1


def test_sanity_of_the_baselines(evaluation):
    _, results, _ = evaluation
    [clip] = results["self_reenactment"]
    # Given the source's own geometry, static and mesh warp give back the source exactly.
    for method in ("static", "mesh warp", "prior warp"):
        assert clip["source_reconstruction"][method] == {"ssim": 1.0, "psnr": 100.0, "l1": 0.0}
    static, warped = clip["methods"]["static"], clip["methods"]["mesh warp"]
    assert warped["ssim"] > static["ssim"] or warped["psnr"] > static["psnr"], (static, warped)
    # The mesh warp moves the portrait's face with the driver, and MediaPipe still finds it.
    assert results["cross_identity"][0]["methods"]["mesh warp"]["face_found"] == 1


def test_missing_feature_space_file_is_a_clear_error(evaluation):
    _, _, tmp = evaluation
    with pytest.raises(SystemExit, match="no such file"):
        main(["reenactment", "--manifest", str(tmp / "manifest.csv"), "--features", str(tmp / "missing.npz")])


def test_motion_fidelity_splits_pose_from_expression():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 10))
    assert motion_fidelity(real, real) == pytest.approx({"fd": 0, "fd_pose": 0, "fd_expression": 0}, abs=1e-6)
    biased = real.copy()
    biased[:, 8] += 1.0  # every frame's 3rd expression feature off by one unit: only the expression part sees it
    scores = motion_fidelity(biased, real)
    assert scores["fd_pose"] == pytest.approx(0, abs=1e-6)
    assert scores["fd_expression"] == pytest.approx(1.0, abs=1e-6) and scores["fd"] == pytest.approx(1.0, abs=1e-6)
    still = np.repeat(real[:1], 50, axis=0)  # a constant output misses the real spread: its variance counts
    assert motion_fidelity(still, real)["fd_pose"] > 1
    assert motion_fidelity(real[:1], real) == {"fd": None, "fd_pose": None, "fd_expression": None}


def test_table_formatting():
    table = format_table({"static": {"ssim": 0.5, "psnr": 20.0, "l1": 0.1, "mouth_corr": 0.0, "eye_corr": None}})
    lines = table.splitlines()
    assert lines[0].startswith("| method") and "0.5000" in lines[2] and "—" in lines[2]
