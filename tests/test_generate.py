"""The command-line generator on random tiny weights: a video with sound, and bad input as an error message."""

import numpy as np
import pytest

from pipeline_infp.generate import main, parse_args
from pipeline_infp.processing import SAMPLE_RATE, read_audio_track, read_video


def test_writes_a_video_with_the_mixed_voices(tmp_path, shared_data):
    out = tmp_path / "out.mp4"
    speech = str(shared_data / "audio" / "dreamtalk-german1.wav")
    argv = ["--portrait", str(shared_data / "portraits" / "liveportrait-driving-d9.jpg"), "--self-audio", speech,
            "--random-preset", "tiny", "--steps", "2", "--size", "64", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    frames, fps = read_video(out)
    audio = read_audio_track(out)
    assert frames.shape[1:] == (64, 64, 3) and fps == pytest.approx(25)
    assert len(audio) / SAMPLE_RATE == pytest.approx(len(frames) / 25, abs=0.05) and np.abs(audio).max() > 0.01
    assert parse_args(argv).close_mouth and not parse_args([*argv, "--keep-portrait-mouth"]).close_mouth
    assert parse_args(argv).silent_mouth_rest == 1.0
    assert parse_args([*argv, "--silent-mouth-rest", "0.5"]).silent_mouth_rest == 0.5


def test_silent_mouth_rest_outside_0_to_1_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--portrait", "p.jpg", "--self-audio", "a.wav", "--out", "o.mp4", "--silent-mouth-rest", "2"])
    assert "--silent-mouth-rest: must be from 0 to 1, got 2" in capsys.readouterr().err


def test_unreadable_audio_is_an_error_message_not_a_traceback(tmp_path, shared_data, capsys):
    bad = tmp_path / "voice.wav"
    bad.write_bytes(b"not audio at all")
    argv = ["--portrait", str(shared_data / "portraits" / "liveportrait-source-s1.jpg"), "--self-audio", str(bad),
            "--random-preset", "tiny", "--out", str(tmp_path / "out.mp4")]  # fmt: skip
    assert main(argv) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "out.mp4").exists()
