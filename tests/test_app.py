"""The demo's generate function on a tiny pipeline: outputs, conversation splitting and every kind of bad input."""

import os
import tempfile
import time

import gradio as gr
import numpy as np
import pytest
import soundfile

import app
from pipeline_infp.processing import SAMPLE_RATE, load_audio, read_video
from tests.utils import tiny_random_pipeline

SIZE = 64
PORTRAIT = str(app.EXAMPLES / "portrait-s1.jpg")


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline()


@pytest.fixture(autouse=True)
def tiny_app(pipe, monkeypatch):
    monkeypatch.setattr(app, "_pipeline", pipe)


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> dict[str, str]:
    """The example conversation cut to 1.2 s per side, and a mixed file of both, as wav files."""
    folder = tmp_path_factory.mktemp("voices")
    man = load_audio(app.EXAMPLES / "conversation-man.wav")
    woman = load_audio(app.EXAMPLES / "conversation-woman.wav")
    paths = {}
    for name, audio in {"own": man[: int(1.2 * SAMPLE_RATE)], "partner": woman[-int(1.2 * SAMPLE_RATE) :]}.items():
        paths[name] = str(folder / f"{name}.wav")
        soundfile.write(paths[name], audio, SAMPLE_RATE)
    paths["mixed"] = str(folder / "mixed.wav")
    soundfile.write(paths["mixed"], man + woman, SAMPLE_RATE)
    return paths


@pytest.fixture(autouse=True)
def scratch(tmp_path, monkeypatch):
    """The temporary-files folder the app's request folders are made in (the test's own, removed with it)."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def quiet(*args, **kwargs):
    """Stands in for gr.Progress."""


@pytest.fixture(autouse=True, params=[True, False], ids=["live", "whole"])
def live_streaming(request, monkeypatch):
    """Every test runs with live streaming (Gradio's, where ffmpeg and ffprobe are installed) and without."""
    monkeypatch.setattr(app, "LIVE_STREAMING", request.param)
    return request.param


def run_app(portrait=PORTRAIT, own=None, partner=None, conversation=None, mode=app.TWO_TRACKS, speaker=0, **kw):
    """All of generate's updates: (live chunks, video, timeline) each."""
    settings = dict(style=app.NO_STYLE, style_clip=None, steps=2, guidance_scale=2.5, silent_mouth_rest=1.0, seed=0,
                    size=SIZE, full_portrait=False) | kw  # fmt: skip
    return list(app.generate(
        portrait, mode, own, partner, conversation, app.SPEAKERS[speaker], *settings.values(), progress=quiet
    ))  # fmt: skip


def generate(**kwargs):
    """The final update: the whole video and the timeline."""
    *_, (live, path, figure) = run_app(**kwargs)
    assert isinstance(live, type(gr.skip()))
    return path, figure


def test_live_streaming_sends_each_window_before_the_whole_video(voices, live_streaming):
    updates = run_app(own=voices["own"], partner=voices["partner"], full_portrait=True)
    chunks = [live for live, _, _ in updates[:-1]]
    whole, _ = read_video(updates[-1][1])
    if not live_streaming:
        assert chunks == []
        return
    # 30 frames in tiny windows of 12 that overlap by 2: 10 frames per chunk.
    streamed = [read_video(chunk)[0] for chunk in chunks]
    assert [len(frames) for frames in streamed] == [10, 10, 10]
    assert all(isinstance(video, type(gr.skip())) for _, video, _ in updates[:-1])
    # The chunks are the whole video in pieces (both H.264: equal up to encoding).
    assert np.abs(np.concatenate(streamed).astype(float) - whole).mean() < 3
    assert whole.shape[1:] != (SIZE, SIZE, 3)  # pasted back into the full portrait


def test_two_tracks_give_a_video_with_sound_and_a_timeline(voices):
    path, figure = generate(own=voices["own"], partner=voices["partner"])
    frames, fps = read_video(path)
    assert fps == 25.0 and len(frames) == 30 and frames.shape[1:] == (SIZE, SIZE, 3)
    labels = [tick.get_text() for tick in figure.axes[0].get_yticklabels()]
    assert labels == ["generated: talking", "partner's voice", "agent's voice"]
    # The agent's voice bar covers speech: the own track of this cut speaks throughout.
    own_bars = figure.axes[0].collections[0].get_paths()
    assert len(own_bars) >= 1


def test_same_seed_same_video_and_requests_never_share_files(voices):
    first, _ = generate(own=voices["own"])
    second, _ = generate(own=voices["own"])
    assert first != second
    np.testing.assert_array_equal(read_video(first)[0], read_video(second)[0])


def test_a_new_request_removes_request_folders_older_than_an_hour(scratch):
    old, recent = app.request_folder(), app.request_folder()
    (old / "infp.mp4").write_bytes(b"video")
    hours_ago = time.time() - app.KEEP_REQUEST_FILES_S - 60
    os.utime(old, (hours_ago, hours_ago))
    new = app.request_folder()
    assert not old.exists() and recent.is_dir() and new.is_dir()
    assert sorted(scratch.glob("infp-requests/*")) == sorted([recent, new])


def test_conversation_file_is_split_and_the_agent_chosen(voices):
    own_1, partner_1 = app.resolve_tracks(app.ONE_FILE, None, None, voices["mixed"], app.SPEAKERS[0])
    own_2, partner_2 = app.resolve_tracks(app.ONE_FILE, None, None, voices["mixed"], app.SPEAKERS[1])
    np.testing.assert_array_equal(own_1, partner_2)
    np.testing.assert_array_equal(own_2, partner_1)
    path, _ = generate(conversation=voices["mixed"], mode=app.ONE_FILE, speaker=1, steps=1)
    assert len(read_video(path)[0]) == round(len(own_1) / SAMPLE_RATE * 25)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (dict(portrait=None), "Upload a portrait"),
        (dict(own=None), "agent's own voice"),
        (dict(mode=app.ONE_FILE), "conversation recording"),
        (dict(own="not-there.wav"), "not found|does not exist|cannot|could not"),
    ],
)
def test_missing_or_unreadable_input_is_a_readable_error(inputs, message, voices, scratch):
    with pytest.raises(gr.Error, match=message):
        generate(**({"own": voices["own"]} | inputs))
    assert not list(scratch.glob("infp-requests/*"))  # no request folder left behind


def test_no_face_unreadable_audio_silence_and_length_are_readable_errors(voices, tmp_path, monkeypatch, scratch):
    blank = tmp_path / "wall.png"
    from PIL import Image

    Image.new("RGB", (256, 256), (120, 120, 120)).save(blank)
    with pytest.raises(gr.Error, match="[Nn]o face"):
        generate(portrait=str(blank), own=voices["own"])
    garbage = tmp_path / "voice.wav"
    garbage.write_text("not audio")
    with pytest.raises(gr.Error, match="agent's voice"):
        generate(own=str(garbage))
    silent = tmp_path / "silent.wav"
    soundfile.write(silent, np.zeros(SAMPLE_RATE, np.float32), SAMPLE_RATE)
    with pytest.raises(gr.Error, match="silent"):
        generate(own=str(silent), partner=str(silent))
    monkeypatch.setattr(app, "MAX_SECONDS", 1.0)
    with pytest.raises(gr.Error, match="agent's voice track is 1.2 s long; the limit is 1 s: trim it, or run the app"):
        generate(own=voices["own"])
    assert not list(scratch.glob("infp-requests/*"))  # refused requests leave no folder behind


def test_gpu_reservation_grows_with_audio_and_steps(voices, tmp_path):
    long = tmp_path / "long.wav"
    soundfile.write(long, np.tile(load_audio(voices["own"]), 8), SAMPLE_RATE)
    args = (PORTRAIT, app.TWO_TRACKS)
    short_time = app.gpu_seconds(*args, voices["own"], None, None, app.SPEAKERS[0], app.NO_STYLE, None, 20)
    long_time = app.gpu_seconds(*args, str(long), None, None, app.SPEAKERS[0], app.NO_STYLE, None, 20)
    more_steps = app.gpu_seconds(*args, str(long), None, None, app.SPEAKERS[0], app.NO_STYLE, None, 50)
    assert short_time < long_time < more_steps <= 120


def test_the_interface_builds_with_examples(pipe):
    demo = app.build_demo(pipe)
    assert isinstance(demo, gr.Blocks)
    assert len(app.example_rows()) >= 2
