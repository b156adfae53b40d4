"""Motion metrics on series whose answers are known by construction."""

import numpy as np
import pytest

from pipeline_infp.motion_metrics import (
    blinks_per_minute,
    closed_mouth_fraction,
    frechet_distance,
    paired_frechet_distance,
    rpcc,
    sid,
    speaking_state,
    temporal_variance,
)

RNG = np.random.default_rng(0)


def test_frechet_distance_of_shifted_and_scaled_gaussians():
    x = RNG.normal(size=(20000, 3))
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0])
    assert frechet_distance(x, x + shift) == pytest.approx(5.0, abs=1e-6)  # means differ by |shift|² only
    # Unit vs. doubled spread in every dimension: Tr(I + 4I − 2·2I) = 3.
    assert frechet_distance(x, 2 * x) == pytest.approx(3.0, rel=0.02)
    assert frechet_distance(x, 2 * x) == pytest.approx(frechet_distance(2 * x, x), rel=1e-6)
    assert frechet_distance([x[:100], x[100:200]], x[:200]) == pytest.approx(0, abs=1e-6)  # lists of sequences


def test_paired_distance_sees_a_broken_pairing_that_the_plain_one_cannot():
    motion = RNG.normal(size=(5000, 2))
    speech = motion + 0.1 * RNG.normal(size=motion.shape)  # motion follows the speech
    shuffled = motion[RNG.permutation(len(motion))]
    assert frechet_distance(shuffled, motion) < 0.01
    assert paired_frechet_distance(shuffled, speech, motion, speech) > 1.0


def test_sid_is_the_entropy_of_cluster_use():
    centres = np.array([[0.0], [10.0], [20.0], [30.0]])
    still = np.zeros((40, 1))
    everywhere = np.repeat(centres, 10, axis=0)
    assert sid([still], centres) == 0.0
    assert sid([everywhere], centres) == pytest.approx(np.log(4))
    assert sid([still, everywhere], centres) == pytest.approx(np.log(4) / 2)


def test_temporal_variance_and_rpcc():
    t = np.linspace(0, 4 * np.pi, 500, endpoint=False)[:, None]  # whole periods
    assert temporal_variance([np.zeros((50, 3))]) == 0
    assert temporal_variance([np.hstack([np.sin(t), 2 * np.sin(t)])]) == pytest.approx((0.5 + 2.0) / 2, rel=0.05)
    partner = np.sin(t)
    assert rpcc([np.sin(t)], [partner], [np.sin(t)]) == pytest.approx(0, abs=1e-9)
    assert rpcc([-np.sin(t)], [partner], [np.sin(t)]) == pytest.approx(2, abs=1e-6)


def test_blinks_are_short_dips_and_long_closures_are_not():
    fps, aperture = 25, np.full(25 * 60, 0.3)  # one minute, eyes open
    for start in (100, 700, 1200):
        aperture[start : start + 4] = 0.05  # three blinks of 0.16 s
    assert blinks_per_minute(aperture, fps) == pytest.approx(3)
    aperture[300:400] = 0.05  # eyes shut for 4 s: not a blink
    assert blinks_per_minute(aperture, fps) == pytest.approx(3)
    assert blinks_per_minute(aperture[: 25 * 30], fps) == pytest.approx(2 * 2)  # 2 in half a minute (100, 700)


def test_closed_mouth_fraction_and_speaking_state():
    fps = 25
    aperture = np.zeros(200)
    aperture[100:] = 0.15 * (1 + np.sin(np.arange(100) * 2 * np.pi * 4 / fps)) / 2  # syllables at 4 Hz
    listening = np.arange(200) < 100
    assert closed_mouth_fraction(aperture, listening) == 1.0
    assert closed_mouth_fraction(aperture, ~listening) < 0.5
    assert np.isnan(closed_mouth_fraction(aperture, np.zeros(200, bool)))
    state = speaking_state(aperture, fps)
    assert not state[:80].any() and state[120:].all()
