"""Motion features: pose from a similarity alignment, expression free of pose, fit/save/load."""

import numpy as np
import pytest

from pipeline_infp.motion_features import MotionFeatureSpace, align, pose_angles
from pipeline_infp.processing import FaceProcessor


@pytest.fixture(scope="module")
def mesh(shared_data):
    with FaceProcessor() as processor:
        return processor.crop_portrait(shared_data / "portraits" / "liveportrait-source-s1.jpg").landmarks.astype(
            float
        )


def rotation_matrix(yaw, pitch=0.0):
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return r_pitch @ r_yaw


def rotate(points, yaw, pitch=0.0):
    centre = points.mean(0)
    return (points - centre) @ rotation_matrix(yaw, pitch).T + centre


def test_align_recovers_a_similarity():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 3))
    moved = 2.5 * rotate(points, 0.3, -0.2) + [1.0, -2.0, 0.5]
    scale, rotation, shift = align(moved, points)
    np.testing.assert_allclose(scale * moved @ rotation.T + shift, points, atol=1e-9)
    assert scale == pytest.approx(1 / 2.5)
    np.testing.assert_allclose(rotation, rotation_matrix(0.3, -0.2).T, atol=1e-9)  # undoes the head's rotation
    np.testing.assert_allclose(pose_angles(rotation_matrix(0.0, 0.25)), [0, 0.25, 0], atol=1e-9)


def test_turning_the_head_changes_pose_not_expression(mesh):
    sequence = np.stack([mesh] + [rotate(mesh, yaw) for yaw in (0.1, 0.2, -0.15)] + [mesh * 1.3 + 7])
    opened = mesh.copy()
    opened[[14, 87, 317, 17], 1] += 6.0  # lower lip down: an expression change
    space = MotionFeatureSpace.fit([sequence, np.stack([mesh, opened])], components=3)
    features = space.transform(sequence)
    assert features.shape == (5, space.dim) == (5, 9)
    yaw = features[:, 0] * space.pose_scale[0]
    assert np.abs(np.abs(yaw[1:4]) - [0.1, 0.2, 0.15]).max() < 0.02
    expression = features[:, 6:]
    assert (
        np.abs(expression - expression[0]).max()
        < 0.05 * np.abs(space.transform(np.stack([mesh, opened]))[1, 6:]).max()
    )
    assert space.transform(np.stack([mesh, opened]))[1, 6:].std() > 0.1


def test_save_and_load_round_trip(mesh, tmp_path):
    space = MotionFeatureSpace.fit([np.stack([mesh, rotate(mesh, 0.1), mesh * 1.1])], components=2)
    space.save(tmp_path / "space.npz")
    loaded = MotionFeatureSpace.load(tmp_path / "space.npz")
    np.testing.assert_array_equal(loaded.transform(mesh[None]), space.transform(mesh[None]))
