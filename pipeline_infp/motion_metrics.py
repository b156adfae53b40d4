"""Metrics of generated head motion (stage 2), as defined for listener generation by L2L, ELP and DIM.

Every function takes per-frame motion features as float arrays [T, D] (one sequence) or lists of them, and
plain aperture series (`processing.mouth_aperture`, `processing.eye_aperture`: gaps in inter-ocular units).

* `frechet_distance`: realism, the Fréchet distance between the Gaussians fitted to two sets of frames;
  `paired_frechet_distance` does it on frames concatenated with the matching speech features (synchrony).
* `sid`: diversity, the entropy of the histogram of k-means cluster ids within each sequence, averaged.
* `temporal_variance`: the variance of the features over time, averaged over dimensions and sequences.
* `rpcc`: |PCC(generated, partner) − PCC(ground truth, partner)|, PCC averaged over feature dimensions.
* `blinks_per_minute`, `closed_mouth_fraction`, `speaking_state`: what a viewer notices first.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from pipeline_infp.processing.face import OPEN_MOUTH_APERTURE

__all__ = [
    "blinks_per_minute",
    "closed_mouth_fraction",
    "frechet_distance",
    "paired_frechet_distance",
    "rpcc",
    "sid",
    "speaking_state",
    "temporal_variance",
]

# Eyes count as closed below this fraction of the sequence's median aperture; a blink is a closed stretch
# of at most `_MAX_BLINK_S` seconds (longer is eyes shut, not a blink).
_BLINK_RATIO = 0.6
_MAX_BLINK_S = 0.5


def _frames(sequences) -> np.ndarray:
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        return sequences.astype(np.float64)
    return np.concatenate([np.asarray(s, dtype=np.float64) for s in sequences])


def frechet_distance(generated, reference) -> float:
    """Fréchet distance between Gaussians fitted to two frame sets (arrays [N, D] or lists of sequences):
    ||μ₁ − μ₂||² + Tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)."""
    a, b = _frames(generated), _frames(reference)
    if a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"Need ≥ 2 frames of the same dimension in both sets, got {a.shape} and {b.shape}.")
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # A constant method (static) has a singular covariance: a tiny ridge keeps the square root defined.
    ridge = np.eye(len(cov_a)) * 1e-9
    root = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    distance = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * np.real(root))
    return float(max(distance, 0.0))


def paired_frechet_distance(generated, generated_context, reference, reference_context) -> float:
    """`frechet_distance` of frames joined with their context features (e.g. the partner's speech)."""
    join = lambda motion, context: np.concatenate([_frames(motion), _frames(context)], axis=1)  # noqa: E731
    return frechet_distance(join(generated, generated_context), join(reference, reference_context))


def sid(sequences, centres: np.ndarray) -> float:
    """Mean over sequences of the entropy (nats) of the histogram of nearest-centre ids (k-means centres [k, D]
    fitted on ground-truth frames)."""
    entropies = []
    for sequence in sequences:
        x = np.asarray(sequence, dtype=np.float64)
        ids = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
        p = np.bincount(ids, minlength=len(centres)) / len(ids)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def temporal_variance(sequences) -> float:
    """Variance over time per dimension, averaged over dimensions and sequences."""
    return float(np.mean([np.asarray(s, dtype=np.float64).var(axis=0).mean() for s in sequences]))


def _pcc(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation per feature dimension (dimensions constant in either series count as 0), averaged."""
    a, b = a - a.mean(0), b - b.mean(0)
    denominator = np.sqrt((a**2).sum(0) * (b**2).sum(0))
    return float(np.mean(np.where(denominator > 1e-12, (a * b).sum(0) / np.maximum(denominator, 1e-12), 0.0)))


def rpcc(generated, partner, reference) -> float:
    """Residual PCC: |PCC(generated, partner) − PCC(reference, partner)| averaged over sequences; `partner` holds
    the other side's features per frame (same dimension as the motion features)."""
    return float(
        np.mean(
            [
                abs(
                    _pcc(np.asarray(g, float), np.asarray(p, float)) - _pcc(np.asarray(r, float), np.asarray(p, float))
                )
                for g, p, r in zip(generated, partner, reference)
            ]
        )
    )


def blinks_per_minute(eye_aperture: np.ndarray, fps: float) -> float:
    """Blinks per minute: dips of the eye aperture below 60 % of its median lasting at most 0.5 s."""
    aperture = np.asarray(eye_aperture, dtype=np.float64)
    if len(aperture) == 0:
        return 0.0
    closed = np.concatenate([[0], (aperture < _BLINK_RATIO * np.nanmedian(aperture)).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(closed))
    durations = edges[1::2] - edges[::2]
    blinks = int(np.sum(durations <= round(_MAX_BLINK_S * fps)))
    return blinks / (len(aperture) / fps / 60.0)


def closed_mouth_fraction(
    mouth_aperture: np.ndarray, frames: np.ndarray, threshold: float = OPEN_MOUTH_APERTURE
) -> float:
    """Fraction of the selected frames (bool mask, e.g. where only the partner speaks) whose inner-lip gap is below
    `threshold` inter-ocular distances (NaN when no frame is selected)."""
    selected = np.asarray(mouth_aperture, dtype=np.float64)[np.asarray(frames, dtype=bool)]
    return float(np.mean(selected < threshold)) if len(selected) else float("nan")


def speaking_state(
    mouth_aperture: np.ndarray, fps: float, window_s: float = 0.5, threshold: float = 0.02
) -> np.ndarray:
    """Per-frame speaking state read from the motion alone: the mouth aperture's standard deviation over a
    centred `window_s` window exceeds `threshold` (lips moving like speech). Returns bool [T]."""
    aperture = np.nan_to_num(np.asarray(mouth_aperture, dtype=np.float64), nan=0.0)
    half = max(1, round(window_s * fps / 2))
    padded = np.pad(aperture, half, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1)
    return windows.std(axis=1) > threshold
