"""`evaluate motion` end to end on a tiny trained-shape pipeline, and its helpers."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline_infp import INFPPipeline, build_pipeline
from pipeline_infp.evaluate import main, read_manifest
from pipeline_infp.evaluate_motion import (
    boundary_ratio,
    conversation_items,
    expression_measures,
    mouth_correlations,
    retrieve,
)
from pipeline_infp.evaluate_screen import driven_mouth
from pipeline_infp.processing import FaceProcessor, mouth_aperture

VAL, TRAIN, PORTRAIT = "video-retalkin-4", "styletalk-feifeili-clip1", "liveportrait-source-s1"
PAIR = ("infinitetalk-pair-man", "infinitetalk-pair-woman")
PORTRAIT_PATH = f"portraits/{PORTRAIT}.jpg"


def test_boundary_ratio_sees_jumps_between_windows():
    smooth = torch.linspace(0, 1, 100)[:, None].repeat(1, 4)
    assert boundary_ratio(smooth, 25) == pytest.approx(1.0)
    jumpy = smooth.clone()
    jumpy[50:] += 1.0
    assert boundary_ratio(jumpy, 25) > 5
    # Windows of 25 every 20 frames: a jump anywhere in a join (the 6 steps into, through and out of the 5
    # shared frames) is a seam; the same jump between joins is not.
    assert boundary_ratio(smooth, 25, overlap=5) == pytest.approx(1.0)
    for at in (20, 25):
        jumpy = smooth.clone()
        jumpy[at:] += 1.0
        assert boundary_ratio(jumpy, 25, overlap=5) > 2
    jumpy = smooth.clone()
    jumpy[30:] += 1.0
    assert boundary_ratio(jumpy, 25, overlap=5) < 1


def test_expression_measures_see_a_smile_and_raised_brows():
    face = np.zeros((1, 478, 3))
    face[0, 33, 0], face[0, 263, 0] = -1.0, 1.0  # inter-ocular distance 2
    face[0, [13, 14, 61, 291], 1] = 3.0
    face[0, [159, 386], 1], face[0, [105, 334], 1] = 0.0, -0.5
    smile, surprise = face.copy(), face.copy()
    smile[0, [61, 291], 1] -= 0.2  # corners up (image y points down)
    surprise[0, [105, 334], 1] -= 0.4
    neutral = expression_measures(face)
    assert expression_measures(smile)["corner_lift"] - neutral["corner_lift"] == pytest.approx(0.1)
    assert expression_measures(surprise)["brow_raise"] - neutral["brow_raise"] == pytest.approx(0.2)
    assert expression_measures(smile)["brow_raise"] == neutral["brow_raise"]


def test_lag_searched_mouth_correlation_forgives_footage_with_late_sound():
    rng = np.random.default_rng(0)
    speech = np.convolve(rng.random(203), np.ones(4) / 4, mode="same")  # a mouth following 203 frames of sound
    vad = np.ones(200)
    vad[80:100] = 0.0  # a pause: its frames are not compared
    # Sound 3 frames late (like the Obama clips): the audio at frame t is what the face said at frame t - 3, so a
    # generated frame moves with the real mouth 3 frames before it.
    generated = {"mouth": speech[:200]}
    truth = {"mouth": speech[3:], "own_vad": vad}
    [(at_zero, zero)] = mouth_correlations([generated], [truth])
    [(searched, lag)] = mouth_correlations([generated], [truth], max_lag=5)
    assert zero == 0 and at_zero < 0.5
    assert lag == -3 and searched == pytest.approx(1.0)
    assert mouth_correlations([generated], [truth], max_lag=2)[0][0] < searched
    # A mouth that does not move gives 0 at every lag, and the lag nearest 0 is named.
    assert mouth_correlations([{"mouth": np.zeros(200)}], [truth], max_lag=5) == [(0.0, 0)]


def test_retrieval_takes_the_second_with_the_nearest_audio():
    rng = np.random.default_rng(0)
    loud, quiet = rng.normal(size=16000).astype(np.float32), 0.001 * rng.normal(size=16000).astype(np.float32)
    from pipeline_infp.evaluate_motion import speech_features

    def summary(audio):
        m = speech_features(audio, 25, 25.0)
        return np.concatenate([m.mean(0), m.std(0)])[None]

    bank = [
        {"latents": torch.zeros(25, 2), "summaries": summary(quiet)},
        {"latents": torch.ones(25, 2), "summaries": summary(loud)},
    ]
    out = retrieve(bank, np.concatenate([loud, quiet]), 50, 25.0)
    assert torch.all(out[:25] == 1) and torch.all(out[25:] == 0)


def test_every_portrait_gives_each_portrait_a_side_with_the_sides_in_turn(shared_data, tmp_path):
    portraits = ["liveportrait-source-s1", "liveportrait-driving-d12", "dreamtalk-cropped-f30"]
    with open(shared_data / "manifest.csv", newline="") as handle:
        rows = {row["id"]: row for row in csv.DictReader(handle)}
    with open(tmp_path / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[PORTRAIT]))
        writer.writeheader()
        for key in (*portraits, *PAIR):
            writer.writerow({**rows[key], "path": str(shared_data / rows[key]["path"])})
    entries = read_manifest(tmp_path / "manifest.csv")
    args = SimpleNamespace(max_seconds=1.0, size=128, every_portrait=False)
    with FaceProcessor() as processor:
        default = conversation_items(entries, processor, args)
        every = conversation_items(entries, processor, SimpleNamespace(**{**vars(args), "every_portrait": True}))
    man, woman = PAIR
    # By default one item per side, portraits in turn: the third portrait never listens.
    assert [item["id"] for item in default] == [
        f"{man} (partner {woman}, portrait {portraits[0]})",
        f"{woman} (partner {man}, portrait {portraits[1]})",
    ]
    # Every portrait gets a side; the sides repeat in turn, so each item is still a whole conversation side.
    assert [item["id"] for item in every] == [item["id"] for item in default] + [
        f"{man} (partner {woman}, portrait {portraits[2]})"
    ]
    np.testing.assert_array_equal(every[2]["audio"], every[0]["audio"])
    np.testing.assert_array_equal(every[2]["partner"], every[0]["partner"])
    assert len(every[0]["audio"]) == 16000  # capped at --max-seconds
    assert every[2]["portrait"].image.shape == (128, 128, 3)
    assert not np.array_equal(every[2]["portrait"].image, every[0]["portrait"].image)


@pytest.fixture(scope="module")
def evaluation(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate-motion")
    pipe = build_pipeline("tiny", seed=0)
    pipe.motion_encoder.fit_landmark_basis(torch.randn(32, 478, 3) * 0.02)
    # An untrained pipeline that still shows a face: small generated motion, the decoder copies the warped portrait.
    pipe.motion_transformer.latent_std.fill_(0.01)
    with torch.no_grad():
        pipe.face_decoder.conv_out.bias[3] = 20.0
    style_dim = pipe.motion_guider.config.style_dim
    pipe.motion_guider.register_to_config(style_presets={"neutral": [0.0] * style_dim, "happy": [3.0] * style_dim})
    pipe.save_pretrained(tmp / "pipe")
    with open(shared_data / "manifest.csv", newline="") as handle:
        rows = {row["id"]: row for row in csv.DictReader(handle)}
    with open(tmp / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[VAL]))
        writer.writeheader()
        for key in (VAL, TRAIN, PORTRAIT, *PAIR):
            writer.writerow({**rows[key], "path": str(shared_data / rows[key]["path"])})
    out = tmp / "motion.json"
    returned = main(["motion", "--manifest", str(tmp / "manifest.csv"), "--checkpoint", str(tmp / "pipe"),
                     "--json", str(out), "--max-seconds", "2.5", "--steps", "2", "--no-progress", "--styles",
                     "--sweep-items", "2", "--sweep", "--sweep-steps", "2", "--sweep-guidance", "2.5"])  # fmt: skip
    return returned, json.loads(out.read_text()), tmp


def test_motion_evaluation_reports_every_method_against_the_ground_truth(evaluation):
    returned, results, tmp = evaluation
    assert returned == results and results["command"] == "motion"
    assert (tmp / "pipe" / "motion_features.npz").is_file()  # fitted on the training clip, saved with it
    summary = results["summary"]
    assert set(summary) == {"ground truth", "generated", "static", "random", "retrieval"}
    assert summary["ground truth"]["fd"] == pytest.approx(0, abs=1e-6)
    assert summary["ground truth"]["mse"] == 0
    assert summary["static"]["variance"] < 1e-9 and summary["static"]["sid_expression"] == 0
    assert summary["ground truth"]["closed_mouth_listening"] is None  # no ground truth for conversations
    assert summary["generated"]["closed_mouth_listening"] is not None
    # The portrait kept as it is never opens its mouth beyond its own: a perfect listener by that measure.
    assert summary["static"]["rest_mouth_listening"] == 1.0
    assert "boundary_ratio" in summary["generated"]
    assert set(results["styles"]) == {"neutral", "happy"}  # each preset against neutral
    assert all(value == 0 for value in results["styles"]["neutral"].values())
    kinds = [item["kind"] for item in results["items"]]
    assert kinds == ["talking", "dual", "dual"]
    # One talking clip: its own mouth correlation is the table's.
    assert results["mouth_corr_per_clip"] == {VAL: pytest.approx(summary["generated"]["mouth_corr"], abs=1e-4)}
    searched = results["mouth_corr_lag_searched_per_clip"][VAL]
    assert searched["corr"] == pytest.approx(summary["generated"]["mouth_corr_lag_searched"], abs=1e-4)
    assert searched["corr"] >= summary["generated"]["mouth_corr"] - 1e-4 and abs(searched["lag"]) <= 5
    assert summary["ground truth"]["mouth_corr_lag_searched"] == pytest.approx(1.0)
    # The sweep's one setting is the table's (same steps, guidance and seed): the same video, the same figures.
    [row] = results["sweep"]
    assert (row["steps"], row["guidance_scale"]) == (2, 2.5)
    assert row["fd"] == pytest.approx(summary["generated"]["fd"], abs=1e-3)
    assert row["mouth_corr"] == pytest.approx(summary["generated"]["mouth_corr"], abs=1e-4)
    for key in ("closed_mouth_listening", "rest_mouth_listening"):  # both conversation sides, as in the table
        assert row[key] == pytest.approx(summary["generated"][key], abs=1e-6)
    sides = results["listening_per_side"]
    assert list(sides) == [item["id"] for item in results["items"] if item["kind"] == "dual"]
    closed = [side["closed_mouth_listening"] for side in sides.values() if side["closed_mouth_listening"] is not None]
    assert np.mean(closed) == pytest.approx(summary["generated"]["closed_mouth_listening"], abs=1e-4)
    for method in ("generated", "static", "random", "retrieval"):
        assert method in results["table"]


def test_the_screen_measures_the_meshes_the_renderer_is_driven_to(evaluation, shared_data):
    _, results, tmp = evaluation
    pipe = INFPPipeline.from_pretrained(tmp / "pipe")
    pipe.set_progress_bar_config(disable=True)
    args = SimpleNamespace(steps=2, guidance_scale=2.5, seed=0, window_overlap=None, close_mouth=True,
                           silent_mouth_rest=1.0)  # fmt: skip
    with FaceProcessor() as processor:
        face = processor.crop_portrait(shared_data / PORTRAIT_PATH, size=256)
    own = np.sin(np.arange(40000) / 7.0).astype(np.float32) * 0.3
    driven = []
    original = pipe.prior_flows
    pipe.prior_flows = lambda portrait, meshes, pool=None: (driven.append(meshes), original(portrait, meshes, pool))[1]
    pipe(face, own, np.zeros_like(own), num_inference_steps=2, guidance_scale=2.5, output_type="np",
         generator=torch.Generator().manual_seed(0))  # fmt: skip
    mouth, rest = driven_mouth(pipe, face, own, np.zeros_like(own), args)
    np.testing.assert_allclose(mouth, mouth_aperture(np.concatenate(driven)), atol=1e-5)

    out = tmp / "screen.json"
    screen = main(["motion-screen", "--manifest", str(tmp / "manifest.csv"), "--checkpoint", str(tmp / "pipe"),
                   "--json", str(out), "--max-seconds", "2.5", "--steps", "2", "--no-progress"])  # fmt: skip
    assert json.loads(out.read_text()) == screen
    assert [(r["id"], r["kind"]) for r in screen["items"]] == [(i["id"], i["kind"]) for i in results["items"]]
    summary = screen["summary"]
    assert -1 <= summary["mouth_corr"] <= summary["mouth_corr_lag_searched"] + 1e-4 <= 1 + 1e-4
    # Closed is the stricter test: a rest mesh has an inner-lip gap of at least zero.
    assert 0 <= summary["closed_mouth_listening"] <= summary["rest_mouth_listening"] <= 1
