"""Split one mixed two-person recording into the two speakers' tracks (who speaks when, then silence the other).

What is supported: two people taking turns in one recording, with clearly different voices (a man and a woman,
say). Energy voice activity finds speech; each voiced frame is described by the mean and spread of the MFCCs over
the second around it; k-means splits those descriptions into two speakers. Nothing is downloaded. Measured on
frames where exactly one person speaks by `benchmarks/diarization.py`: 90 % right on the example
man/woman conversation, but near chance on real recordings of similar voices (61-63 % on two DualTalk
conversations, 54 % on the pyannote sample with its RTTM labels). It cannot tell one speaker from two, and
moments where both talk go to one of them. The app shows the split on its timeline; when it is wrong, give the
two tracks separately.
"""

from dataclasses import dataclass

import librosa
import numpy as np
from sklearn.cluster import KMeans

from .audio import SAMPLE_RATE, voice_activity
from .errors import AudioLoadError

FPS = 25.0  # label resolution: one video frame
SEGMENT_FRAMES = 25  # ~1 s of context per speaker description
MIN_SPEAKER_SECONDS = 0.5


@dataclass
class Diarization:
    """tracks: [2, N] float32 at 16 kHz, speaker 1 (who speaks first) then speaker 2, each the input with the
    other speaker's turns muted; speaker: int8 [frames] at 25 fps, 0 = nobody, 1 or 2 = who speaks."""

    tracks: np.ndarray
    speaker: np.ndarray


def _frame_features(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """20 MFCCs per 25 fps frame (40 ms hop), without the loudness coefficient: the voice, not the volume."""
    hop = round(SAMPLE_RATE / FPS)
    mfcc = librosa.feature.mfcc(y=audio, sr=SAMPLE_RATE, n_mfcc=21, n_fft=1024, hop_length=hop)[1:].T
    return np.pad(mfcc, ((0, max(0, num_frames - len(mfcc))), (0, 0)), mode="edge")[:num_frames]


def _segment_descriptions(features: np.ndarray, voiced: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mean and spread of the MFCCs over each voiced frame's surrounding second (voiced frames only)."""
    frames = np.flatnonzero(voiced)
    half = SEGMENT_FRAMES // 2
    descriptions = []
    for frame in frames:
        around = frames[(frames >= frame - half) & (frames <= frame + half)]
        window = features[around]
        descriptions.append(np.concatenate([window.mean(0), window.std(0)]))
    return frames, descriptions


def _smooth_labels(labels: np.ndarray, frames: np.ndarray, width: int = 9) -> np.ndarray:
    """Majority vote over neighbouring voiced frames: a speaker turn lasts longer than a few frames."""
    smoothed = labels.copy()
    half = width // 2
    for i in range(len(labels)):
        near = labels[max(0, i - half) : i + half + 1]
        gaps = np.abs(frames[max(0, i - half) : i + half + 1] - frames[i]) <= half * 2
        smoothed[i] = int(np.round(near[gaps].mean()))
    return smoothed


def split_speakers(audio: np.ndarray, seed: int = 0) -> Diarization:
    """Two speaker tracks from one mixed 16 kHz mono recording (see the module docstring for what works)."""
    audio = np.asarray(audio, dtype=np.float32)
    num_frames = max(1, round(len(audio) / SAMPLE_RATE * FPS))
    # A low threshold: in one recording the quieter speaker's turns sit far below the louder one's.
    voiced = voice_activity(audio, num_frames, fps=FPS, relative_threshold=0.15) > 0.5
    min_frames = round(MIN_SPEAKER_SECONDS * FPS)
    if voiced.sum() < 2 * min_frames:
        raise AudioLoadError(
            "The conversation file has too little speech to tell two speakers apart "
            f"(found {voiced.sum() / FPS:.1f} s). Give the agent's voice and the partner's voice as two files instead."
        )
    frames, descriptions = _segment_descriptions(_frame_features(audio, num_frames), voiced)
    descriptions = np.stack(descriptions)
    descriptions = (descriptions - descriptions.mean(0)) / (descriptions.std(0) + 1e-6)
    labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(descriptions)
    labels = _smooth_labels(labels, frames)
    counts = np.bincount(labels, minlength=2)
    if counts.min() < min_frames:
        raise AudioLoadError(
            "Only one speaker was found in the conversation file. Give the agent's voice and the partner's voice "
            "as two files instead."
        )
    first = labels[0]  # speaker 1 is whoever speaks first
    speaker = np.zeros(num_frames, np.int8)
    speaker[frames] = np.where(labels == first, 1, 2)
    return Diarization(tracks=_mask_tracks(audio, speaker), speaker=speaker)


def _mask_tracks(audio: np.ndarray, speaker: np.ndarray) -> np.ndarray:
    """Each speaker's turns kept, the rest muted, with 40 ms fades so cuts do not click."""
    hop = SAMPLE_RATE / FPS
    sample_frame = np.minimum((np.arange(len(audio)) / hop).astype(int), len(speaker) - 1)
    fade = np.hanning(2 * round(hop) + 1)
    fade /= fade.sum()
    tracks = []
    for who in (1, 2):
        gain = np.convolve((speaker[sample_frame] == who).astype(np.float32), fade, mode="same")
        tracks.append(audio * gain.astype(np.float32))
    return np.stack(tracks)


def conversation_tracks(audio: np.ndarray, agent_speaker: int) -> tuple[np.ndarray, np.ndarray]:
    """(own, partner) tracks from one mixed recording: `agent_speaker` 1 is whoever speaks first, 2 the other."""
    if agent_speaker not in (1, 2):
        raise ValueError(f"agent_speaker must be 1 (who speaks first) or 2, got {agent_speaker!r}.")
    tracks = split_speakers(audio).tracks
    return tracks[agent_speaker - 1], tracks[2 - agent_speaker]
