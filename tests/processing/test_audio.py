import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile as sf

from pipeline_infp.processing import (
    SAMPLE_RATE,
    AudioLoadError,
    AudioTooLongError,
    INFPInputError,
    check_duration,
    is_silent,
    load_audio,
    mix_tracks,
    pad_to_same_length,
    silence_weights,
    voice_activity,
)


@pytest.fixture(scope="module")
def speech(shared_data):
    return load_audio(shared_data / "audio" / "dreamtalk-german1.wav")


def _overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    a, b = pad_to_same_length(a, b)
    n = int(len(a) / SAMPLE_RATE * 25)
    va, vb = voice_activity(a, n), voice_activity(b, n)
    return float((va * vb).sum() / np.maximum(va, vb).sum()), va, vb


# --------------------------------------------------------------------------- loading


def test_load_wav_16k_mono(speech, shared_data):
    assert speech.dtype == np.float32 and speech.ndim == 1
    assert len(speech) == sf.info(str(shared_data / "audio" / "dreamtalk-german1.wav")).frames
    assert 0.05 < np.abs(speech).max() <= 1.0


@pytest.mark.parametrize("name, seconds", [("sadtalker-japanese.wav", 436436 / 48000), ("hallo-1.wav", 7.5)])
def test_load_resamples_stereo_to_16k_mono(shared_data, name, seconds):
    audio = load_audio(shared_data / "audio" / name)
    assert audio.ndim == 1 and audio.dtype == np.float32
    assert abs(len(audio) - seconds * SAMPLE_RATE) <= 2
    assert not is_silent(audio)


def test_gradio_tuples_and_arrays_agree(speech):
    pcm = np.round(speech * 32767).astype(np.int16)
    stereo = np.stack([pcm, pcm], axis=1)  # (N, 2) as Gradio gives
    for value in [(SAMPLE_RATE, stereo), (stereo, SAMPLE_RATE), (SAMPLE_RATE, stereo.T), (SAMPLE_RATE, pcm)]:
        np.testing.assert_allclose(load_audio(value), speech, atol=1e-4)
    np.testing.assert_array_equal(load_audio(speech), speech)  # 1-D array: 16 kHz by default
    full_scale = load_audio(np.array([32767, -32768] * 1000, np.int16), sample_rate=16000)
    assert full_scale.max() == pytest.approx(1.0, abs=1e-4) and full_scale.min() == -1.0


def test_array_with_sample_rate_is_resampled(speech):
    at_8k = speech[::2]
    up = load_audio(at_8k, sample_rate=8000)
    assert abs(len(up) - 2 * len(at_8k)) <= 1
    up_tuple = load_audio((8000, (at_8k * 32767).astype(np.int16)))
    np.testing.assert_allclose(up_tuple, up, atol=1e-3)


def test_ffmpeg_formats(speech, tmp_path):
    """Formats libsndfile cannot read (m4a/AAC) go through the bundled ffmpeg."""
    wav, m4a = tmp_path / "s.wav", tmp_path / "s.m4a"
    sf.write(str(wav), speech, SAMPLE_RATE)
    subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True
    )
    audio = load_audio(m4a)
    assert abs(len(audio) - len(speech)) < 0.05 * SAMPLE_RATE
    n = min(len(audio), len(speech))
    assert np.corrcoef(audio[:n], speech[:n])[0, 1] > 0.9


def test_missing_empty_and_corrupt_files(tmp_path):
    with pytest.raises(AudioLoadError, match=r"own voice file .*nope\.wav does not exist"):
        load_audio(tmp_path / "nope.wav", name="own voice")
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
    for path in (empty, corrupt):
        with pytest.raises(AudioLoadError, match="partner voice.*corrupt or not an audio format.*Convert"):
            load_audio(path, name="partner voice")
    zero = tmp_path / "zero.wav"
    sf.write(str(zero), np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioLoadError, match="0 samples"):
        load_audio(zero)
    assert issubclass(AudioLoadError, INFPInputError)


def test_bad_arrays():
    with pytest.raises(AudioLoadError, match="at least 40 ms"):
        load_audio(np.zeros(int(0.03 * SAMPLE_RATE), np.float32))
    with pytest.raises(AudioLoadError, match="NaN"):
        load_audio(np.full(SAMPLE_RATE, np.nan, np.float32))
    with pytest.raises(AudioLoadError, match="at most 8 channels"):
        load_audio(np.zeros((20, 1000), np.float32))
    with pytest.raises(AudioLoadError, match="sample rate"):
        load_audio((0, np.zeros(1000, np.int16)))


# --------------------------------------------------------------------------- checks and mixing


def test_check_duration():
    long = np.zeros(95 * SAMPLE_RATE, np.float32)
    with pytest.raises(AudioTooLongError, match=r"own voice track is 95\.0 s long; the limit is 60 s: trim"):
        check_duration(long, 60.0, "own voice")
    check_duration(long, 95.0, "own voice")


def test_is_silent(speech):
    assert is_silent(np.zeros(SAMPLE_RATE, np.float32))
    assert is_silent(np.zeros(0, np.float32))
    assert is_silent(np.random.default_rng(0).normal(0, 1e-4, SAMPLE_RATE))  # -80 dBFS hiss
    assert not is_silent(speech)
    assert not is_silent(speech * 0.03)  # quiet speech (-57 dBFS) is still speech
    assert is_silent(speech * 0.03, threshold_db=-40)


def test_pad_and_mix():
    a, b = np.full(10, 0.3, np.float32), np.full(4, 0.5, np.float32)
    pa, pb = pad_to_same_length(a, b)
    assert len(pa) == len(pb) == 10 and (pb[4:] == 0).all() and (pb[:4] == 0.5).all()
    np.testing.assert_allclose(mix_tracks(a, b), np.r_[[0.8] * 4, [0.3] * 6], atol=1e-6)
    loud = mix_tracks(np.full(10, 0.9, np.float32), np.full(10, 0.6, np.float32))
    assert np.abs(loud).max() == pytest.approx(1.0)


# --------------------------------------------------------------------------- voice activity


def test_voice_activity_on_speech_and_silence(speech):
    tail = 2 * SAMPLE_RATE
    audio = np.concatenate([speech, np.zeros(tail, np.float32)])
    n = int(len(audio) / SAMPLE_RATE * 25)
    vad = voice_activity(audio, n)
    assert vad.shape == (n,) and vad.dtype == np.float32 and set(np.unique(vad)) <= {0.0, 1.0}
    speech_frames = int(len(speech) / SAMPLE_RATE * 25)
    assert vad[20 : speech_frames - 20].mean() > 0.9  # speaks throughout the sentence
    assert vad[speech_frames + 5 :].max() == 0  # digital silence after it
    assert not voice_activity(np.zeros(SAMPLE_RATE, np.float32), 25).any()
    assert voice_activity(speech[:SAMPLE_RATE], 50)[30:].max() == 0  # frames past the audio's end


def test_silence_weights_ease_in_and_out_around_speech():
    activity = np.zeros(20, np.float32)
    activity[8:10] = 1
    expected = [1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(silence_weights(activity, ramp=4), expected, atol=1e-6)
    np.testing.assert_allclose(silence_weights(activity, ramp=0), 1 - activity)
    assert silence_weights(np.zeros(5)).tolist() == [1.0] * 5  # only listening
    assert not silence_weights(np.ones(5)).any()
    assert silence_weights(np.zeros(0)).shape == (0,)


def test_voice_activity_hangover():
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    on = ((t > 0.5) & (t < 1.0)) | ((t > 1.12) & (t < 1.6)) | ((t > 2.3) & (t < 2.34))
    vad = voice_activity(np.where(on, tone, 0).astype(np.float32), 75)
    assert vad[15:38].all()  # the 0.12 s pause between words is bridged
    assert not vad[45:].any()  # the 40 ms click is dropped
    assert not vad[:10].any()


def test_dual_tracks_mostly_alternate(shared_data):
    audio = shared_data / "audio"
    overlap, va, vb = _overlap(
        load_audio(audio / "infinitetalk-pair-man.wav"), load_audio(audio / "infinitetalk-pair-woman.wav")
    )
    assert overlap < 0.05 and va.mean() > 0.3 and vb.mean() > 0.3
    for pair in ["dualtalk-ubjudm1mige-sub-video-72", "dualtalk-xkhwlcdsojc-sub-video-109-000"]:
        tracks = [load_audio(audio / f"{pair}-speaker{i}.wav") for i in (1, 2)]
        overlap, va, vb = _overlap(*tracks)
        # Real conversation: back-channels and interruptions overlap, but most speech is one-sided.
        assert overlap < 0.5, pair
        assert 0.2 < va.mean() < 0.9 and 0.2 < vb.mean() < 0.9, pair
