import os
import threading

import numpy as np
import pytest
from PIL import Image

from pipeline_infp.processing import (
    SAMPLE_RATE,
    VideoLoadError,
    load_audio,
    read_audio_track,
    read_video,
    write_video,
)


def _numbered_frames(count: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Frame i is a flat grey of level 8 * i, so decoded frames can be identified."""
    return np.stack([np.full((height, width, 3), 8 * i, np.uint8) for i in range(count)])


def _frame_ids(frames: np.ndarray) -> list[int]:
    return [int(round(f.mean() / 8)) for f in frames]


def test_write_then_read_back_with_audio(tmp_path, shared_data):
    speech = load_audio(shared_data / "audio" / "dreamtalk-german1.wav")
    frames = _numbered_frames(30)
    path = write_video(tmp_path / "sub" / "out.mp4", frames, fps=25, audio=speech)  # creates sub/
    assert path == str(tmp_path / "sub" / "out.mp4")

    decoded, source_fps = read_video(path)
    assert decoded.shape == (30, 48, 64, 3) and decoded.dtype == np.uint8
    assert source_fps == pytest.approx(25.0)
    assert _frame_ids(decoded) == list(range(30))

    audio = read_audio_track(path)
    assert audio is not None and audio.dtype == np.float32
    assert len(audio) / SAMPLE_RATE == pytest.approx(30 / 25, abs=0.03)  # trimmed to the video
    n = min(len(audio), 16000)
    assert np.corrcoef(audio[:n], speech[:n])[0, 1] > 0.95


def test_short_audio_is_padded_and_float_or_pil_frames_work(tmp_path):
    tone = np.sin(np.linspace(0, 200 * np.pi, SAMPLE_RATE // 2)).astype(np.float32) * 0.5  # 0.5 s
    float_frames = np.random.default_rng(0).random((25, 31, 33, 3))  # odd size
    path = write_video(tmp_path / "a.mp4", float_frames, fps=12.5, audio=tone)
    decoded, fps = read_video(path, fps=12.5)
    assert decoded.shape == (25, 32, 34, 3) and fps == pytest.approx(12.5)  # padded to even
    audio = read_audio_track(path)
    assert len(audio) / SAMPLE_RATE == pytest.approx(2.0, abs=0.03)
    assert np.abs(audio[-SAMPLE_RATE // 2 :]).max() < 0.01  # the padding is silence

    pil = [Image.fromarray(f) for f in _numbered_frames(5)]
    path = write_video(tmp_path / "b.mp4", pil, fps=25)
    assert _frame_ids(read_video(path)[0]) == list(range(5))
    assert read_audio_track(path) is None  # no audio stream


def test_read_video_resamples_by_timestamp(tmp_path):
    path = write_video(tmp_path / "30fps.mp4", _numbered_frames(30), fps=30)
    frames, source_fps = read_video(path, fps=25)
    assert source_fps == pytest.approx(30)
    assert _frame_ids(frames) == [round(k * 30 / 25) for k in range(25)]  # nearest source frame
    slow, _ = read_video(path, fps=60, max_frames=7)
    assert _frame_ids(slow) == [0, 0, 1, 2, 2, 2, 3]  # round(k / 2), Python rounds half to even


def test_read_real_clip_and_its_audio(shared_data):
    path = shared_data / "video" / "hellomeme-qie.mp4"  # 15 fps, 38 frames
    frames, source_fps = read_video(path)
    assert source_fps == pytest.approx(15.0)
    assert frames.shape == (63, 512, 512, 3)
    audio = read_audio_track(path)
    assert len(audio) / SAMPLE_RATE == pytest.approx(2.44, abs=0.1)
    assert read_audio_track(shared_data / "video" / "eamm-contempt.mp4") is None  # no audio stream


@pytest.mark.parametrize("delayed", ["video", "audio"])
def test_audio_is_aligned_to_the_first_video_frame(tmp_path, delayed):
    import subprocess

    import imageio_ffmpeg

    rng = np.random.default_rng(0)
    noise = (0.3 * rng.standard_normal(2 * SAMPLE_RATE)).astype(np.float32)
    path = write_video(tmp_path / "synced.mp4", _numbered_frames(50), fps=25, audio=noise)
    original = read_audio_track(path)
    # Remux with one stream starting 0.2 s late, as some containers do (e.g. video at 0.08 s, audio at 0).
    shifted = tmp_path / f"{delayed}-late.mkv"  # PCM audio: AAC's priming samples would move the start
    late, early = ("0:v", "1:a") if delayed == "video" else ("1:v", "0:a")
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-itsoffset", "0.2", "-i", str(path), "-i", str(path),
           "-map", late, "-map", early, "-c:v", "copy", "-c:a", "pcm_s16le", str(shifted)]  # fmt: skip
    subprocess.run(cmd, check=True)

    audio = read_audio_track(shifted)
    offset = int(0.2 * SAMPLE_RATE)
    if delayed == "video":  # frame 0 is shown at 0.2 s: the audio before it is dropped
        assert len(audio) == pytest.approx(len(original) - offset, abs=50)
        np.testing.assert_allclose(audio[:SAMPLE_RATE], original[offset : offset + SAMPLE_RATE], atol=1e-4)
    else:  # the audio starts 0.2 s after frame 0: silence first
        assert np.abs(audio[:offset]).max() == 0.0
        np.testing.assert_allclose(audio[offset : offset + SAMPLE_RATE], original[:SAMPLE_RATE], atol=1e-4)


def test_missing_and_corrupt_videos(tmp_path):
    with pytest.raises(VideoLoadError, match="not found"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(VideoLoadError, match="not found"):
        read_audio_track(tmp_path / "nope.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    # Fixed bytes: a random 4 KB now and then holds an MPEG audio frame header that ffmpeg decodes as sound.
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VideoLoadError, match="corrupt|Could not open"):
        read_video(corrupt)
    with pytest.raises(VideoLoadError, match="corrupt"):
        read_audio_track(corrupt)


def test_concurrent_writes_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # moviepy's default temp files would land here
    tone = (0.3 * np.sin(np.arange(SAMPLE_RATE) / SAMPLE_RATE * 2 * np.pi * 440)).astype(np.float32)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            write_video(f"out{i}.mp4", _numbered_frames(20) // (i + 1), fps=20, audio=tone * (i + 1) / 4)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(os.listdir(tmp_path)) == [f"out{i}.mp4" for i in range(4)]  # no stray temp files
    for i in range(4):
        frames, _ = read_video(f"out{i}.mp4", fps=20)
        expected = [8 * k // (i + 1) for k in range(20)]
        np.testing.assert_allclose([f.mean() for f in frames], expected, atol=2)  # its own frames
        audio = read_audio_track(f"out{i}.mp4")
        assert len(audio) == pytest.approx(SAMPLE_RATE, abs=0.03 * SAMPLE_RATE)
        rms = np.sqrt(np.mean(audio[2000:-2000] ** 2))
        assert rms == pytest.approx(0.3 * (i + 1) / 4 / np.sqrt(2), rel=0.1)  # its own track
