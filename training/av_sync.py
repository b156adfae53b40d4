"""Audio-video offsets of talking clips, measured by a small sync expert (used by prepare_motion.py).

Some public footage carries its sound a few frames off the picture (in our data the Obama clips run 80-200 ms
late, several HelloMeme clips as much early): a motion model trained on it learns lips that run ahead of or
behind the voice. The expert is a ridge regression from a few frames of Whisper features around a frame to that
frame's mouth opening. Each clip is predicted by an expert fitted on the *other* identities' clips, at audio
shifts of -K..K frames; the clip's offset is the shift whose prediction correlates best with the measured mouth,
kept only when it is a peak inside the searched range and clearly beats no shift. The expert is then refitted on
the corrected clips and the offsets measured again (two rounds), so a handful of clips off sync do not blur it.

Sign: offset k means the sound of timeline frame t lies at audio frame t + k (audio late by k / 25 s); a
loader takes the own track's features and voice activity at t + k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONTEXT = 2  # feature frames either side of the predicted one
COMPONENTS = 32  # Whisper features reduced by PCA before the regression
RIDGE = 10.0


@dataclass
class SyncClip:
    """What the expert needs of one talking clip: Whisper features [timeline_frames, D], the timeline index of
    each kept frame [T] and each kept frame's mouth opening [T]."""

    id: str
    identity: str
    features: np.ndarray
    indices: np.ndarray
    mouth: np.ndarray


@dataclass
class SyncResult:
    offset: int  # frames; 0 when no shift is clearly better
    correlation: float  # at the chosen offset
    correlation_at_zero: float
    curve: list[float]  # correlation at shifts -max_offset..max_offset


def _stacked(features: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Features at positions t-CONTEXT..t+CONTEXT (clamped to the track), side by side: [len(positions), (2C+1) D]."""
    last = len(features) - 1
    return np.concatenate([features[np.clip(positions + d, 0, last)] for d in range(-CONTEXT, CONTEXT + 1)], axis=1)


def _standardised(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / max(float(values.std()), 1e-8)


def _design(clip: SyncClip, reduced: np.ndarray, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, standardised mouth) of the frames whose shifted audio lies inside the track; `reduced` is the
    clip's features after the PCA projection."""
    positions = clip.indices + shift
    valid = (positions >= 0) & (positions < len(reduced))
    return _stacked(reduced, positions[valid]), _standardised(clip.mouth[valid])


def _fit(clips: list[SyncClip], reduced: dict[str, np.ndarray], shifts: dict[str, int]) -> np.ndarray:
    """Ridge weights (last entry: bias) from the clips at their current shifts."""
    inputs, targets = zip(*(_design(c, reduced[c.id], shifts.get(c.id, 0)) for c in clips))
    x, y = np.concatenate(inputs), np.concatenate(targets)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    penalty = RIDGE * len(x) / 1000 * np.eye(x.shape[1])
    penalty[-1, -1] = 0.0
    return np.linalg.solve(x.T @ x + penalty, x.T @ y)


def _curve(clip: SyncClip, reduced: np.ndarray, weights: np.ndarray, max_offset: int) -> list[float]:
    curve = []
    for shift in range(-max_offset, max_offset + 1):
        x, y = _design(clip, reduced, shift)
        prediction = np.concatenate([x, np.ones((len(x), 1))], axis=1) @ weights
        curve.append(float(np.corrcoef(prediction, y)[0, 1]) if len(y) > 2 and prediction.std() > 0 else 0.0)
    return curve


def estimate_offsets(
    clips: list[SyncClip], max_offset: int = 6, min_correlation: float = 0.3, min_gain: float = 0.05, rounds: int = 2
) -> dict[str, SyncResult]:
    """Each clip's audio-video offset (see the module docstring). A shift is kept when it is a peak inside the
    searched range, its correlation reaches `min_correlation` and it beats no shift by `min_gain`; otherwise the
    clip keeps offset 0. Clips whose identity is the only one get offset 0 (there is no other identity to fit an
    expert on)."""
    if not clips:
        return {}
    frames = np.concatenate([np.asarray(c.features, dtype=np.float64)[c.indices] for c in clips])
    mean = frames.mean(axis=0)
    _, _, vt = np.linalg.svd(frames[:: max(1, len(frames) // 20000)] - mean, full_matrices=False)
    projection = vt[:COMPONENTS].T
    reduced = {c.id: (np.asarray(c.features, dtype=np.float64) - mean) @ projection for c in clips}
    identities = sorted({c.identity for c in clips})
    shifts: dict[str, int] = {}
    results: dict[str, SyncResult] = {}
    for _ in range(rounds):
        weights = {
            identity: _fit([c for c in clips if c.identity != identity], reduced, shifts)
            for identity in identities
            if len(identities) > 1
        }
        results = {}
        for clip in clips:
            if clip.identity not in weights:
                results[clip.id] = SyncResult(0, float("nan"), float("nan"), [])
                continue
            curve = _curve(clip, reduced[clip.id], weights[clip.identity], max_offset)
            best = int(np.argmax(curve))
            at_zero = curve[max_offset]
            # A best shift at the edge of the search is no peak: the curve may still rise beyond, or be flat.
            inside = 0 < best < len(curve) - 1
            confident = inside and curve[best] >= min_correlation and curve[best] - at_zero >= min_gain
            offset = best - max_offset if confident else 0
            results[clip.id] = SyncResult(offset, curve[offset + max_offset], at_zero, curve)
        shifts = {clip_id: r.offset for clip_id, r in results.items()}
    return results
