"""Splitting one two-person recording into the two speakers' tracks."""

import numpy as np
import pytest

from pipeline_infp.processing import SAMPLE_RATE, AudioLoadError
from pipeline_infp.processing.diarize import FPS, conversation_tracks, split_speakers


def voice(seconds: float, pitch: float, seed: int) -> np.ndarray:
    """Speech-like: harmonics of `pitch` with a formant-ish tilt, a syllable-rate envelope and jitter."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0 = pitch * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    tone = sum(np.sin(k * phase) * (0.8 if pitch > 150 else 1.2) ** -k for k in range(1, 12))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6))
    return (0.1 * tone * envelope + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def conversation(turns: list[tuple[int, float]], pause: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """Turns of (speaker 1 = low voice / 2 = high voice, seconds) with pauses; returns audio and per-frame truth."""
    audio, truth = [], []
    for i, (who, seconds) in enumerate(turns):
        audio += [
            voice(seconds, 110.0 if who == 1 else 240.0, seed=i),
            np.zeros(round(pause * SAMPLE_RATE), np.float32),
        ]
        truth += [np.full(round(seconds * FPS), who), np.zeros(round(pause * FPS), int)]
    return np.concatenate(audio), np.concatenate(truth)


def test_turns_are_assigned_to_the_right_speaker_in_order_of_appearance():
    audio, truth = conversation([(2, 2.0), (1, 1.5), (2, 1.2), (1, 2.0), (2, 1.0)])
    result = split_speakers(audio)
    speaking = truth > 0
    n = min(len(truth), len(result.speaker))
    # Speaker 1 is whoever speaks first: here the high voice, which `truth` calls 2.
    expected = np.where(truth[:n] == 2, 1, 2)
    accuracy = np.mean(result.speaker[:n][speaking[:n]] == expected[speaking[:n]])
    assert accuracy > 0.9
    assert result.tracks.shape == (2, len(audio))
    # Each track keeps its speaker's turns and mutes the other's.
    first_turn = slice(int(0.3 * SAMPLE_RATE), int(1.7 * SAMPLE_RATE))
    assert np.abs(result.tracks[0, first_turn]).mean() > 20 * np.abs(result.tracks[1, first_turn]).mean()


def test_agent_speaker_picks_the_own_track():
    audio, _ = conversation([(1, 1.5), (2, 1.5), (1, 1.0), (2, 1.0)])
    own_1, partner_1 = conversation_tracks(audio, 1)
    own_2, partner_2 = conversation_tracks(audio, 2)
    np.testing.assert_array_equal(own_1, partner_2)
    np.testing.assert_array_equal(own_2, partner_1)
    with pytest.raises(ValueError, match="agent_speaker"):
        conversation_tracks(audio, 3)


def test_too_little_speech_is_refused_with_advice():
    with pytest.raises(AudioLoadError, match="two files"):
        split_speakers(np.zeros(3 * SAMPLE_RATE, np.float32))
    with pytest.raises(AudioLoadError, match="two files"):
        split_speakers(voice(0.5, 120.0, seed=0))
