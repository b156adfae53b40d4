"""Per-frame motion features of a face from its MediaPipe mesh, for evaluating generated motion.

A frame's 478 landmarks become (1) head pose: yaw, pitch, roll (radians), the face centre's position in
inter-ocular units from the sequence's first frame, and the log scale change, from a similarity alignment
(Umeyama) onto a reference shape; (2) expression: the aligned mesh minus the reference shape, reduced by a
PCA. The reference shape, the PCA and the pose and expression scales are fitted once on ground-truth frames
of a training set (`MotionFeatureSpace.fit`) and saved as an .npz beside a checkpoint, so every method is
measured in the same space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["POSE_DIM", "MotionFeatureSpace", "align", "pose_angles"]

_POINTS = 468  # the mesh without the iris points
# A frame's features start with its head pose (yaw, pitch, roll, centre x, y, log scale); expression follows.
POSE_DIM = 6


def align(points: np.ndarray, reference: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (scale s, rotation R, translation t) minimising |s R p + t − q|² over points [N, 3] → [N, 3]."""
    mu_p, mu_q = points.mean(0), reference.mean(0)
    p, q = points - mu_p, reference - mu_q
    u, sigma, vt = np.linalg.svd(q.T @ p)
    d = np.sign(np.linalg.det(u @ vt))
    correction = np.diag([1.0, 1.0, d])
    rotation = u @ correction @ vt
    scale = float((sigma * np.diag(correction)).sum() / (p**2).sum())
    return scale, rotation, mu_q - scale * rotation @ mu_p


def pose_angles(rotation: np.ndarray) -> np.ndarray:
    """(yaw, pitch, roll) in radians of a rotation matrix (y-x-z order)."""
    yaw = np.arcsin(np.clip(-rotation[2, 0], -1, 1))
    pitch = np.arctan2(rotation[2, 1], rotation[2, 2])
    roll = np.arctan2(rotation[1, 0], rotation[0, 0])
    return np.array([yaw, pitch, roll])


@dataclass
class MotionFeatureSpace:
    reference: np.ndarray  # [468, 3] mean shape (unit inter-ocular scale, centred)
    expression_mean: np.ndarray  # [468 * 3]
    expression_basis: np.ndarray  # [k, 468 * 3]
    expression_scale: np.ndarray  # [k]
    pose_scale: np.ndarray  # [POSE_DIM]

    @property
    def dim(self) -> int:
        return POSE_DIM + len(self.expression_basis)

    @staticmethod
    def _normalised(landmarks: np.ndarray) -> np.ndarray:
        pts = np.asarray(landmarks, dtype=np.float64)[..., :_POINTS, :]
        iod = np.linalg.norm(pts[..., 33, :2] - pts[..., 263, :2], axis=-1)[..., None, None]
        return pts / np.maximum(iod, 1e-6)

    def _raw(self, landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per frame: pose [T, 6] (angles, centre offset from frame 0, log scale change) and aligned mesh offsets."""
        pts = self._normalised(landmarks)
        poses, shapes = [], []
        for frame in pts:
            scale, rotation, _ = align(frame, self.reference)
            aligned = scale * (frame - frame.mean(0)) @ rotation.T
            poses.append(np.concatenate([pose_angles(rotation), frame.mean(0)[:2], [np.log(scale)]]))
            shapes.append((aligned - self.reference).reshape(-1))
        poses = np.array(poses)
        poses[:, 3:6] -= poses[:1, 3:6]  # position and size relative to the sequence's start
        return poses, np.array(shapes)

    def transform(self, landmarks: np.ndarray) -> np.ndarray:
        """Features [T, POSE_DIM + k] of a landmark sequence [T, 478, 3]: pose then expression, each dimension scaled
        to unit spread on the fitting set."""
        poses, shapes = self._raw(landmarks)
        expression = (shapes - self.expression_mean) @ self.expression_basis.T / self.expression_scale
        return np.concatenate([poses / self.pose_scale, expression], axis=1)

    @classmethod
    def fit(cls, sequences: list[np.ndarray], components: int = 20) -> MotionFeatureSpace:
        """Fit on ground-truth landmark sequences [T, 478, 3]."""
        frames = np.concatenate([cls._normalised(s) for s in sequences])
        reference = frames[0] - frames[0].mean(0)
        for _ in range(2):  # Procrustes mean: align everything to the current mean, average, repeat
            aligned = []
            for frame in frames[:: max(1, len(frames) // 2000)]:
                scale, rotation, _ = align(frame, reference)
                aligned.append(scale * (frame - frame.mean(0)) @ rotation.T)
            reference = np.mean(aligned, axis=0)
        space = cls(reference, np.zeros(reference.size), np.zeros((0, reference.size)), np.ones(0), np.ones(POSE_DIM))
        poses, shapes = zip(*(space._raw(s) for s in sequences))
        poses, shapes = np.concatenate(poses), np.concatenate(shapes)
        mean = shapes.mean(0)
        _, singular, vt = np.linalg.svd(shapes - mean, full_matrices=False)
        space.expression_mean, space.expression_basis = mean, vt[:components]
        space.expression_scale = np.maximum(singular[:components] / np.sqrt(len(shapes)), 1e-8)
        space.pose_scale = np.maximum(poses.std(0), 1e-6)
        return space

    def save(self, path: str | Path) -> None:
        np.savez(path, **{k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: str | Path) -> MotionFeatureSpace:
        with np.load(path) as data:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
