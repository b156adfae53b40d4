"""Stage-2 data: motion latents relative to a neutral reference frame, Whisper features, staleness."""

import json

import numpy as np
import pytest
import torch

from pipeline_infp import build_pipeline
from training.prepare_motion import main
from training.prepared import PreparedDataset


def save_tiny_pipeline(folder, seed: int):
    pipe = build_pipeline("tiny", seed=seed)
    encoder = pipe.motion_encoder
    generator = torch.Generator().manual_seed(seed)
    encoder.fit_landmark_basis(torch.randn(32, encoder.config.num_landmarks, 3, generator=generator) * 0.05)
    pipe.save_pretrained(folder)
    return pipe


@pytest.fixture(scope="module")
def prepared_motion(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("motion")
    pipe = save_tiny_pipeline(tmp / "pipe", seed=0)
    out = tmp / "motion"
    index = main(["--data_dir", str(data_dir), "--checkpoint", str(tmp / "pipe"), "--out", str(out)])
    return index, out, pipe, tmp


def test_latents_and_features_for_every_clip_and_track(data_dir, prepared_motion):
    index, out, pipe, _ = prepared_motion
    data = PreparedDataset(data_dir)
    latent_dim = pipe.motion_encoder.config.latent_dim
    feature_dim = pipe.audio_encoder.feature_dim
    clips = data.clips(kinds=["talking"])
    assert sorted(index["clips"]) == sorted(c.id for c in clips)
    for clip in clips:
        latents = np.load(out / "clips" / clip.id / "latents.npy")
        whisper = np.load(out / "clips" / clip.id / "whisper.npy")
        assert latents.shape == (clip.num_frames, latent_dim) and latents.dtype == np.float32
        assert whisper.shape == (clip.timeline_frames, feature_dim) and whisper.dtype == np.float16
        # The reference frame's mesh is its own reference: no geometric motion; other frames move.
        reference = index["clips"][clip.id]["reference_frame"]
        k = pipe.motion_encoder.config.landmark_components
        np.testing.assert_allclose(latents[reference, :k], 0, atol=1e-5)
        assert np.abs(latents[:, :k]).max() > 1e-3
    [track] = data.audio_tracks()
    assert np.load(out / "audio" / f"{track.id}.whisper.npy").shape[0] == len(track.vad)
    assert np.load(out / "silence.whisper.npy").shape[0] == 60 * data.fps


def test_reruns_skip_finished_work_and_a_new_motion_encoder_recomputes_only_latents(data_dir, prepared_motion):
    index, out, _, tmp = prepared_motion
    clip_id = sorted(index["clips"])[0]
    latents_path, whisper_path = out / "clips" / clip_id / "latents.npy", out / "clips" / clip_id / "whisper.npy"
    stamps = latents_path.stat().st_mtime_ns, whisper_path.stat().st_mtime_ns
    main(["--data_dir", str(data_dir), "--checkpoint", str(tmp / "pipe"), "--out", str(out)])
    assert (latents_path.stat().st_mtime_ns, whisper_path.stat().st_mtime_ns) == stamps

    save_tiny_pipeline(tmp / "other", seed=1)
    before = np.load(latents_path)
    again = main(["--data_dir", str(data_dir), "--checkpoint", str(tmp / "other"), "--out", str(out)])
    assert again["motion_encoder"] != index["motion_encoder"]
    assert json.loads((out / "motion.json").read_text())["motion_encoder"] == again["motion_encoder"]
    assert not np.allclose(np.load(latents_path), before)
    assert whisper_path.stat().st_mtime_ns == stamps[1]


def test_a_clip_prepared_again_gets_new_features_and_latents(data_dir, prepared_motion, tmp_path):
    import shutil

    import soundfile as sf

    _, out, _, _ = prepared_motion
    data_copy, out_copy = tmp_path / "data", tmp_path / "motion"
    shutil.copytree(data_dir, data_copy)
    shutil.copytree(out, out_copy)
    clip = PreparedDataset(data_copy).clips(kinds=["talking"])[0]
    others = [c for c in sorted(json.loads((out_copy / "motion.json").read_text())["clips"]) if c != clip.id]
    stamps = {c: (out_copy / "clips" / c / "latents.npy").stat().st_mtime_ns for c in others}
    # As prepare_data.py --overwrite would after a fix: the same clip, its audio now starting later.
    audio_path = clip.folder / "audio.wav"
    audio, rate = sf.read(audio_path, dtype="float32")
    sf.write(audio_path, np.roll(audio, rate // 10), rate, subtype="PCM_16")
    whisper_before = np.load(out_copy / "clips" / clip.id / "whisper.npy")
    checkpoint = json.loads((out_copy / "motion.json").read_text())["checkpoint"]  # the latents' own encoder
    main(["--data_dir", str(data_copy), "--checkpoint", checkpoint, "--out", str(out_copy)])
    assert not np.array_equal(np.load(out_copy / "clips" / clip.id / "whisper.npy"), whisper_before)
    assert {c: (out_copy / "clips" / c / "latents.npy").stat().st_mtime_ns for c in others} == stamps
