import csv
import json
import os

import cv2
import numpy as np
import pytest
import soundfile as sf

from pipeline_infp.processing import FaceProcessor, read_video, write_video
from training.prepare_data import main, read_manifest, scan_videos, shot_starts
from training.prepared import NotPreparedError, PreparedClip, PreparedDataset

SIZE = 256
TALKING = "styletalk-obama-clip1"  # 256x256, 30 fps: resampled to 25
DYADIC = "difflistener-ak2bm8mfl3w-00012-crop00"  # 1040x608 split screen
PORTRAIT = "liveportrait-source-s1"
SPEECH = "dreamtalk-spanish1"
TURNS = "pyannote-audio-sample"  # a wav row and an rttm row share the id
FIELDS = ["id", "path", "kind", "real", "split", "identity", "note"]


def _write_manifest(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    """One run over a real talking clip, a split screen, a portrait, a speech wav, a turns wav +
    rttm, a synthetic clip with faceless frames and a clip of pure noise, with 2 workers."""
    tmp = tmp_path_factory.mktemp("prepare")
    rows = {r["id"] + r["path"][-4:]: r for r in csv.DictReader(open(shared_data / "manifest.csv"))}
    wanted = [TALKING, DYADIC, PORTRAIT, SPEECH, TURNS]
    manifest = [dict(r, path=str(shared_data / r["path"])) for r in rows.values() if r["id"] in wanted]

    frames, _ = read_video(shared_data / "video" / f"{TALKING}.mp4", max_frames=30)
    frames = frames.copy()
    frames[10:15] = 0  # five frames without a face
    write_video(tmp / "gappy.mp4", frames, fps=25)
    noise = np.random.default_rng(0).integers(0, 256, (25, 96, 96, 3), dtype=np.uint8)
    write_video(tmp / "noise.mp4", noise, fps=25)
    manifest += [
        dict(id="gappy", path="gappy.mp4", kind="nonverbal", split="val", identity="obama", real="real"),
        dict(id="noise", path=str(tmp / "noise.mp4"), kind="talking", split="train", identity="nobody"),
    ]
    _write_manifest(tmp / "manifest.csv", manifest)
    out = tmp / "out"
    args = ["--manifest", str(tmp / "manifest.csv"), "--out", str(out), "--size", str(SIZE), "--max-seconds", "2"]
    assert main([*args, "--workers", "2"]) == 0
    return dict(out=out, args=args, shared=shared_data, gappy_frames=frames)


@pytest.fixture(scope="module")
def dataset(prepared):
    return PreparedDataset(prepared["out"])


def test_layout_and_index(prepared):
    out = prepared["out"]
    index = json.loads((out / "dataset.json").read_text())
    assert index["version"] == 1 and index["size"] == SIZE and index["fps"] == 25
    assert sorted(c["id"] for c in index["clips"]) == sorted([TALKING, DYADIC, "gappy"])
    assert [p["id"] for p in index["portraits"]] == [PORTRAIT]
    assert sorted(a["id"] for a in index["audio"]) == sorted([SPEECH, TURNS])
    for entry in index["clips"]:
        assert {"id", "kind", "split", "identity", "num_frames", "dropped", "has_audio"} <= set(entry)
    audio = {a["id"]: a for a in index["audio"]}
    assert audio[SPEECH]["seconds"] == pytest.approx(2.0) and audio[SPEECH]["kind"] == "speech"
    assert audio[TURNS]["rttm"] == f"audio/{TURNS}.rttm"
    rttm = (prepared["shared"] / "audio" / f"{TURNS}.rttm").read_bytes()
    assert (out / "audio" / f"{TURNS}.rttm").read_bytes() == rttm
    assert not list((out / "clips").glob(".*partial"))


@pytest.mark.parametrize("clip_id", [TALKING, DYADIC])
def test_clip_files(prepared, clip_id):
    folder = prepared["out"] / "clips" / clip_id
    meta = json.loads((folder / "meta.json").read_text())
    n = meta["num_frames"]
    assert meta["timeline_frames"] == 50 and 45 <= n <= 50  # 2 s at 25 fps
    assert meta["dropped"] == 50 - n and meta["fps"] == 25 and meta["size"] == SIZE and meta["has_audio"]
    assert meta["audio_delay_s"] == 0  # both streams of these clips start at 0 (dfrf-french's do not)
    for key in ("id", "kind", "split", "identity", "real", "source", "source_fps", "note"):
        assert key in meta
    frames = sorted((folder / "frames").iterdir())
    assert [f.name for f in frames] == [f"{i:05d}.jpg" for i in range(n)]
    assert cv2.imread(str(frames[0])).shape == (SIZE, SIZE, 3)

    landmarks, matrices, indices = (np.load(folder / f"{k}.npy") for k in ("landmarks", "matrices", "indices"))
    assert landmarks.dtype == np.float32 and landmarks.shape == (n, 478, 3)
    assert matrices.dtype == np.float32 and matrices.shape == (n, 2, 3)
    assert indices.dtype == np.int64 and indices.shape == (n,)
    assert (np.diff(indices) > 0).all() and indices[0] >= 0 and indices[-1] < 50
    xy = landmarks[..., :2]
    assert (xy > 0).all() and (xy < SIZE).all()  # the whole mesh lies inside the crop

    audio, sr = sf.read(folder / "audio.wav", dtype="int16")
    assert sr == 16000 and audio.ndim == 1 and len(audio) == 50 * 640
    assert sf.info(str(folder / "audio.wav")).subtype == "PCM_16"
    vad = np.load(folder / "vad.npy")
    assert vad.dtype == np.float32 and vad.shape == (50,) and set(np.unique(vad)) <= {0.0, 1.0}
    assert vad.any()  # both clips are speech


def test_frames_are_the_source_warped_by_the_matrices(prepared, dataset):
    """Crop = source frame through matrices[i] (so matrices map frame -> crop) with RGB kept RGB."""
    source, _ = read_video(prepared["shared"] / "video" / f"{TALKING}.mp4", max_frames=50)
    clip = dataset.clip(TALKING)
    for i in (0, len(clip) - 1):
        expected = cv2.warpAffine(
            source[clip.indices[i]], clip.matrices[i].astype(np.float64), (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE
        ).astype(float)
        got = clip.frame(i).astype(float)
        assert np.abs(got - expected).mean() < 4  # JPEG 95
        assert np.abs(got - expected[..., ::-1]).mean() > np.abs(got - expected).mean() + 2


def test_same_crop_rule_as_track_video(prepared, dataset):
    frames, _ = read_video(prepared["shared"] / "video" / f"{TALKING}.mp4", max_frames=50)
    with FaceProcessor() as processor:
        track = processor.track_video(frames, size=SIZE)
    clip = dataset.clip(TALKING)
    assert track.indices.tolist() == clip.indices.tolist()
    np.testing.assert_allclose(clip.matrices, track.matrices, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(clip.landmarks, track.landmarks, atol=1e-2)


def test_dyadic_split_is_cropped_from_the_left_half(prepared, dataset):
    clip = dataset.clip(DYADIC)
    assert clip.meta["region"].startswith("left 512")
    scale, tx = clip.matrices[:, 0, 0], clip.matrices[:, 0, 2]
    centre_x = (SIZE / 2 - tx) / scale  # crop centre in source pixels
    assert (centre_x < 512).all() and (centre_x > 0).all()
    # The crop matches the left half, not the generated listener on the right.
    source, _ = read_video(prepared["shared"] / "video" / f"{DYADIC}.mp4", max_frames=1)
    m = clip.matrices[0].astype(np.float64)
    left = cv2.warpAffine(source[0][:, :512], m, (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE).astype(float)
    right_m = m.copy()
    right_m[0, 2] -= 528 * m[0, 0]  # the same square moved onto the right half
    right = cv2.warpAffine(source[0], right_m, (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE).astype(float)
    got = clip.frame(0).astype(float)
    assert np.abs(got - left).mean() < 4 < np.abs(got - right).mean()


def test_faceless_frames_are_dropped_and_runs_split(dataset):
    clip = dataset.clip("gappy")
    assert clip.kind == "nonverbal" and clip.split == "val" and clip.identity == "obama"
    assert clip.dropped == 5 and clip.num_frames == 25 and clip.timeline_frames == 30
    assert clip.indices.tolist() == [*range(10), *range(15, 30)]
    assert clip.contiguous_runs() == [(0, 10), (10, 25)]
    assert clip.contiguous_runs(min_length=12) == [(10, 25)]
    assert not clip.has_audio and clip.audio() is None and clip.vad is None


def test_noise_video_is_skipped_not_fatal(prepared, dataset):
    index = json.loads((prepared["out"] / "dataset.json").read_text())
    assert [(s["id"], s["kind"]) for s in index["skipped"]] == [("noise", "talking")]
    assert "no face" in index["skipped"][0]["reason"]
    assert "noise" not in [c.id for c in dataset.clips()]
    assert not list((prepared["out"] / "clips" / "noise").glob("frames/*.jpg"))


def test_portrait_and_audio_only_items(prepared, dataset):
    out = prepared["out"]
    image = cv2.imread(str(out / "portraits" / f"{PORTRAIT}.jpg"))
    assert image.shape == (SIZE, SIZE, 3)
    (portrait,) = dataset.portraits()
    assert portrait.id == PORTRAIT and portrait.image().shape == (SIZE, SIZE, 3)
    assert portrait.landmarks.shape == (478, 3) and (portrait.landmarks[:, :2] > 0).all()
    assert (portrait.landmarks[:, :2] < SIZE).all()

    (speech,) = dataset.audio_tracks(kinds=["speech"])
    audio = speech.audio()
    assert audio.dtype == np.float32 and len(audio) == 32000 and np.abs(audio).max() > 0.01
    assert speech.vad.shape == (50,)
    (turns,) = dataset.audio_tracks(kinds="turns")
    assert turns.rttm_path.read_text().startswith("SPEAKER")


def test_reader_api(dataset):
    assert dataset.size == SIZE and dataset.fps == 25
    assert {c.id for c in dataset.clips(kinds=["talking", "dyadic-split"])} == {TALKING, DYADIC}
    assert [c.id for c in dataset.clips(splits="val")] == ["gappy"]
    clip = dataset.clip(TALKING)
    assert clip.kind == "talking" and clip.identity == "obama" and clip.has_audio
    frame = clip.frame(3)
    assert frame.dtype == np.uint8 and frame.shape == (SIZE, SIZE, 3)
    assert clip.frames([0, 3, 5]).shape == (3, SIZE, SIZE, 3)
    np.testing.assert_array_equal(clip.frames([3])[0], frame)
    assert isinstance(clip.landmarks, np.memmap) and clip.landmarks.shape == (clip.num_frames, 478, 3)
    audio = clip.audio()
    assert audio.dtype == np.float32 and len(audio) == clip.timeline_frames * 640
    assert clip.vad.shape == (clip.timeline_frames,)
    assert clip.contiguous_runs(10) == [(0, clip.num_frames)]
    with pytest.raises(IndexError):
        clip.frame(clip.num_frames)
    with pytest.raises(KeyError):
        dataset.clip("nope")


def test_contiguous_runs_split_at_gaps_and_shot_cuts(tmp_path):
    folder = tmp_path / "clips" / "c"
    folder.mkdir(parents=True)
    np.save(folder / "indices.npy", np.array([0, 1, 2, 5, 6, 7, 8, 9, 10], np.int64))
    clip = PreparedClip(tmp_path, "c", "talking", "train", "x", 9, False, meta={"shot_starts": [6]})
    assert clip.contiguous_runs() == [(0, 3), (3, 6), (6, 9)]
    assert clip.contiguous_runs(min_length=4) == []

    squares = np.array([[100, 100, 50], [101, 100, 50], [300, 100, 50], [301, 100, 50], [301, 100, 90]], float)
    assert shot_starts(np.arange(5), squares) == [2, 4]  # a jump, then a sudden resize
    assert shot_starts(np.array([0, 1, 30, 31, 32]), squares[[0, 1, 1, 1, 1]]) == [2]  # face lost > 0.5 s


def test_resume_skips_done_items_and_overwrite_redoes_them(prepared, capsys):
    out, args = prepared["out"], prepared["args"]
    frame = out / "clips" / TALKING / "frames" / "00000.jpg"
    before = frame.stat().st_mtime_ns
    (out / "clips" / ".leftover.partial").mkdir()  # a killed run's folder is ignored
    capsys.readouterr()
    assert main([*args, "--workers", "1"]) == 0
    summary = capsys.readouterr().out
    assert "0 prepared" in summary and "8 already done" in summary
    assert frame.stat().st_mtime_ns == before
    index = json.loads((out / "dataset.json").read_text())
    assert len(index["clips"]) == 3 and len(index["skipped"]) == 1

    assert main([*args, "--workers", "1", "--ids", SPEECH, "--overwrite"]) == 0
    assert "1 prepared" in capsys.readouterr().out
    assert frame.stat().st_mtime_ns == before
    assert len(json.loads((out / "dataset.json").read_text())["audio"]) == 2  # index still lists everything

    with pytest.raises(SystemExit, match="size 256"):
        main([*args[:-4], "--size", "512", "--workers", "1"])


def test_not_a_prepared_dataset(tmp_path):
    with pytest.raises(NotPreparedError, match="prepare_data.py"):
        PreparedDataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(NotPreparedError, match="prepare_data.py"):
        PreparedDataset(tmp_path)


def test_videos_folder_and_manifest_input(tmp_path, shared_data):
    (tmp_path / "id001" / "yt1").mkdir(parents=True)
    os.symlink(shared_data / "video" / "grid-bbaf2n.mp4", tmp_path / "alice.mp4")
    os.symlink(shared_data / "video" / "grid-brbk7n.mp4", tmp_path / "id001" / "yt1" / "00001.mp4")
    (tmp_path / "notes.txt").write_text("not a video")
    items = scan_videos(tmp_path)
    assert [(i.id, i.identity, i.kind, i.split) for i in items] == [
        ("alice", "alice", "talking", "train"),
        ("id001__yt1__00001", "id001", "talking", "train"),
    ]
    _write_manifest(tmp_path / "manifest.csv", [dict(id="a", path="alice.mp4", kind="nonverbal")])
    (item,) = scan_videos(tmp_path)  # a manifest.csv in the folder wins
    assert item.kind == "nonverbal" and item.identity == "a" and item.path == str(tmp_path / "alice.mp4")
    assert read_manifest(tmp_path / "manifest.csv")[0].split == "train"


def test_help_explains_the_layout(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for needle in ("dataset.json", "landmarks.npy", "indices.npy", "VoxCeleb2", "--max-seconds"):
        assert needle in text
