#!/usr/bin/env python
"""Stage 1 of INFP: train the face renderer by head imitation (self-reenactment).

A source frame and a driving frame are taken from the same clip, the driving frame cut with the source
frame's crop (the head moves in a still frame, as when the pipeline animates a portrait). The driving
frame enters only through its motion latent: its face mesh's motion relative to the source (projected on
principal motions fitted here on the training data) and its hybrid representation (eyes and lips kept,
face outline drawn). The renderer (appearance encoder, flow estimator, warping face decoder) must
reconstruct the driving frame from the source frame and that latent.

The data is small (tens of identities), so the script leans on what generalises to unseen faces:
- the flow estimator starts from the geometric prior flow of the two meshes and learns a correction;
  it is supervised with the dense correspondence the meshes give (a piecewise-affine warp), so it
  learns geometry rather than identities;
- portraits become extra identities through synthetic pairs: the portrait and a copy moved by a
  random head motion and a mesh-guided expression change, whose flow is known exactly;
- colour, scale and shift augmentation (no mirroring: it would swap the mesh's left and right points);
- when fine-tuning, optionally a teacher (`--teacher_pair_prob`): on cross-identity pairs, which have no real
  target, the lips are kept as the initial renderer draws them, so a fine-tune that gains pixels in
  self-reenactment keeps how it draws other people's mouths moving and at rest.
Losses: L1, SSIM, the flow loss, and a multi-scale patch discriminator (hinge) with feature matching,
over the pixels the driving frame covers; the teacher's L1 over the lips of cross-identity pairs.

Run on this machine (one process, minutes):
    python training/train_head_imitation.py --data_dir prepared --output_dir runs/head --config cpu
Several processes or GPUs (the same script; on a machine without GPUs the processes train on the CPU over gloo —
accelerate 1.x's `--cpu --num_processes N` needs MPI, the torchrun-based launcher does not):
    accelerate launch --multi_gpu --num_processes 2 training/train_head_imitation.py --data_dir prepared ...
    accelerate launch --multi_gpu --num_processes 8 training/train_head_imitation.py --config gpu ...
    accelerate launch --multi_gpu --num_machines 4 --machine_rank R --main_process_ip HOST ... (several nodes)
Resume with `--resume_from_checkpoint latest`. The trained renderer is exported as a pipeline folder
(`<output_dir>/pipeline`, or `--export_to`), which `python -m pipeline_infp.evaluate reenactment` reads.
"""

import argparse
import copy
import logging
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling reader module, also when imported
from pipeline_infp import INFPPipeline, export_for_hub  # noqa: E402
from pipeline_infp.metrics import psnr, ssim  # noqa: E402
from pipeline_infp.presets import component_class, component_config, make_scheduler  # noqa: E402
from pipeline_infp.processing import (  # noqa: E402
    FaceProcessor,
    apply_landmark_offsets,
    apply_matrix,
    hybrid_representation,
    landmark_offsets,
    lips_mask,
    mesh_flow,
    mesh_warp,
    prior_flow,
    retarget_landmarks,
    warp_lock,
)
from pipeline_infp.processing.face import crop_to_crop, mouth_aperture  # noqa: E402
from pipeline_infp.processing.mesh_warp import HEAD_MOTIONS  # noqa: E402
from prepared import PreparedDataset  # noqa: E402

logger = get_logger(__name__)
RENDERER = ("motion_encoder", "appearance_encoder", "flow_estimator", "face_decoder")
KINDS = ("talking", "dyadic-split", "nonverbal", "talking-generated")  # clip kinds trained on by default


# Presets -------------------------------------------------------------------------------------------


def cpu_preset() -> dict:
    """Tens of minutes on a 2-core CPU: the base renderer working at 128², batch 8."""
    return dict(
        renderer="base", resolution=128, train_batch_size=8, max_train_steps=4000, learning_rate=2e-4,
        gan_weight=0.05, gan_start_step=2000, checkpointing_steps=500, validation_steps=500,
    )  # fmt: skip


def gpu_preset() -> dict:
    """One modern GPU for a few hours (or several with accelerate): the renderer working at 256²."""
    return dict(
        renderer="base", resolution=256, train_batch_size=32, max_train_steps=60000, learning_rate=2e-4,
        gan_weight=0.1, gan_start_step=10000, checkpointing_steps=2000, validation_steps=2000,
    )  # fmt: skip


def tiny_preset() -> dict:
    """Seconds: for tests of the script itself."""
    return dict(
        renderer="tiny", resolution=64, train_batch_size=2, max_train_steps=4, learning_rate=1e-3,
        gan_weight=0.1, gan_start_step=2, checkpointing_steps=2, validation_steps=2,
    )  # fmt: skip


PRESETS = {"cpu": cpu_preset, "gpu": gpu_preset, "tiny": tiny_preset}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="a dataset written by training/prepare_data.py")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--config", choices=sorted(PRESETS), default="cpu", help="preset; flags below override it")
    parser.add_argument("--renderer", choices=["tiny", "base"], help="renderer size preset")
    parser.add_argument("--init_from", help="pipeline folder whose renderer weights to start from")
    parser.add_argument(
        "--freeze",
        nargs="+",
        choices=RENDERER,
        default=[],
        help="renderer components to keep as they are; --freeze motion_encoder when fine-tuning a checkpoint whose "
        "stage-2 motion model was trained on its motion latents (they stay valid)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        help="training image size, and a new renderer's working resolution; with --init_from the working resolution "
        "stays the checkpoint's: the renderer resizes larger images for its encoders and warps them at full size, "
        "but the prior flow is then computed at this size, where the pipeline computes it at the working size",
    )
    parser.add_argument("--train_batch_size", type=int)
    parser.add_argument("--max_train_steps", type=int)
    parser.add_argument("--learning_rate", type=float)
    parser.add_argument("--gan_weight", type=float)
    parser.add_argument("--gan_start_step", type=int)
    parser.add_argument("--checkpointing_steps", type=int)
    parser.add_argument("--validation_steps", type=int)
    parser.add_argument("--checkpoints_total_limit", type=int, default=2)
    parser.add_argument("--resume_from_checkpoint", help='a checkpoint folder, or "latest"')
    parser.add_argument("--ssim_weight", type=float, default=1.0)
    parser.add_argument("--flow_weight", type=float, default=1.0, help="mesh-flow supervision at the start")
    parser.add_argument("--flow_weight_final", type=float, default=0.1, help="... decayed linearly to this")
    parser.add_argument(
        "--optical_flow_weight", type=float, default=0.0,
        help="supervision of the flow outside the face mesh (hair, neck, torso) with the optical flow of the two real "
        "frames (OpenCV DIS, where it agrees both ways); the mesh says nothing there",
    )  # fmt: skip
    parser.add_argument(
        "--person_prior", action="store_true",
        help="the prior flow carries the head's motion over hair, ears and neck within the source's person mask "
        "(MediaPipe selfie segmentation); stored in the flow estimator's config, so the pipeline does the same "
        "(kept when fine-tuning weights trained with it)",
    )  # fmt: skip
    parser.add_argument(
        "--head_motion", choices=HEAD_MOTIONS, default=None,
        help="how the person prior moves hair, ears and neck with the head: 'affine' (the face outline's 2-D affine) "
        "or 'rigid' (the head's 3-D rotation at the hair's depth: closer to the real motion when the head turns); "
        "stored in the flow estimator's config. Default: the initial weights' ('affine' for new ones)",
    )  # fmt: skip
    parser.add_argument(
        "--warp_lock_margin", type=float, default=None,
        help="the output is the warped source inside the driving face oval grown by this fraction of the face size "
        "(less the mouth opening), so the decoder draws only the mouth's inside and what lies round the face "
        "(`processing.warp_lock`); stored in the face decoder's config, so the pipeline does the same (kept when "
        "fine-tuning weights trained with it). Default: the learned blend everywhere",
    )  # fmt: skip
    parser.add_argument(
        "--basis_samples", type=int, default=20000, help="frame pairs for fitting the motion encoder's landmark basis"
    )
    parser.add_argument("--feature_matching_weight", type=float, default=1.0)
    parser.add_argument("--portrait_pair_prob", type=float, default=0.2, help="share of synthetic portrait pairs")
    parser.add_argument(
        "--closing_pair_prob", type=float, default=0.0,
        help="share of clip pairs whose source has the mouth wide open and whose driving frame has it closed",
    )  # fmt: skip
    parser.add_argument(
        "--teacher_pair_prob", type=float, default=0.0,
        help="share of cross-identity pairs: a portrait or training frame driven by another clip's motion (a quarter "
        "of them held still, as a portrait at rest), with no real target; there the output's lips are kept as "
        "--teacher draws them (L1 over the lips grown by a twentieth of the face, times --teacher_weight)",
    )  # fmt: skip
    parser.add_argument(
        "--teacher", help="pipeline folder of the renderer to keep on cross-identity pairs (default: --init_from); "
        "it renders with the trained renderer's prior flow and warp lock, so give it the same person prior"
    )  # fmt: skip
    parser.add_argument("--teacher_weight", type=float, default=1.0)
    parser.add_argument(
        "--teacher_sources", choices=["frames+portraits", "frames"], default="frames+portraits",
        help="faces the cross-identity pairs move: half of them portraits (when --portrait_pair_prob > 0) and the "
        "rest training frames, or training frames only (the released renderer's teacher fine-tune)",
    )  # fmt: skip
    parser.add_argument("--kinds", nargs="+", default=list(KINDS))
    parser.add_argument("--dataloader_num_workers", type=int, default=1)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--report_to", default=None, help="tensorboard / wandb / ... (optional)")
    parser.add_argument("--export_to", help="also write the final renderer pipeline here (fp16), e.g. a checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.config]().items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.teacher_pair_prob > 0 and not (args.teacher or args.init_from):
        parser.error("--teacher_pair_prob needs a renderer to keep: give --teacher or --init_from.")
    return args


# Data ----------------------------------------------------------------------------------------------


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] → float [3, H, W] in [-1, 1] (in numpy: cheaper than torch's strided copy here)."""
    return torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)


class HeadImitationDataset(Dataset):
    """Random (source, driving) pairs; every index draws its own pair, so any sampler shards it cleanly."""

    def __init__(
        self,
        data: PreparedDataset,
        kinds,
        split: str,
        resolution: int,
        portrait_pair_prob: float,
        seed: int,
        length: int,
        closing_pair_prob: float = 0.0,
        with_optical_flow: bool = False,
        teacher_pair_prob: float = 0.0,
        teacher_from_portraits: bool = True,
    ):
        self.clips = [c for c in data.clips(kinds=kinds, splits=[split]) if c.num_frames >= 2]
        if not self.clips:
            raise ValueError(f"No {split} clips of kinds {kinds} in {data.root}: check --data_dir and --kinds.")
        frames = np.array([c.num_frames for c in self.clips], dtype=np.float64)
        self.weights = frames / frames.sum()
        self.portraits = data.portraits() if portrait_pair_prob > 0 else []
        self.portrait_pair_prob = portrait_pair_prob if self.portraits else 0.0
        self.closing = closing_frames(self.clips) if closing_pair_prob > 0 else []
        self.closing_pair_prob = closing_pair_prob if self.closing else 0.0
        self.teacher_pair_prob = teacher_pair_prob
        self.teacher_from_portraits = teacher_from_portraits
        self.size, self.resolution, self.seed, self.length = data.size, resolution, seed, length
        self.with_optical_flow = with_optical_flow
        cv2.setNumThreads(1)  # workers share the cores with the training process (spawned ones: one_opencv_thread)
        self.resumed_at = 0  # a resumed run draws new pairs instead of replaying the first ones
        self.landmark_basis = None  # the motion encoder's basis, so the prior flow is the one it can encode
        self.person_prior, self.head_motion = False, "affine"  # the flow estimator's, known once it is built
        self.warp_lock_margin = None  # the face decoder's, likewise
        self._processor = None  # created on first use, in the process that uses it (workers are spawned then)

    def __len__(self) -> int:
        return self.length

    def random_clip_pair(self, rng) -> tuple:
        """(clip, i, j): two frames of one clip drawn in proportion to clip length."""
        clip = self.clips[rng.choice(len(self.clips), p=self.weights)]
        i, j = rng.integers(clip.num_frames, size=2)
        return clip, i, j

    def random_closing_pair(self, rng) -> tuple:
        """(clip, i, j): a frame with the mouth wide open and one with the lips closed, of a clip that has both, so the
        renderer learns to draw lips over a mouth interior (an open-mouthed portrait made to listen)."""
        clip, opened, closed = self.closing[rng.integers(len(self.closing))]
        return clip, rng.choice(opened), rng.choice(closed)

    def landmark_offset_samples(self, count: int, seed: int) -> np.ndarray:
        """Driving-mesh offsets [count, N, 3] of random pairs (the motion encoder's basis is fitted on them)."""
        rng = np.random.default_rng((seed, 1))
        samples = []
        for _ in range(count):
            clip, i, j = self.random_clip_pair(rng)
            reframe = crop_to_crop(clip.matrices[j], clip.matrices[i])
            samples.append(landmark_offsets(apply_matrix(clip.landmarks[j], reframe), clip.landmarks[i]))
        return np.stack(samples)

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, self.resumed_at, index))
        if self.teacher_pair_prob > 0:  # drawn only when asked for, so other runs keep their random pairs
            teacher = rng.random() < self.teacher_pair_prob
            sample = self.cross_identity_pair(rng) if teacher else self.reenactment_pair(rng)
            lips = sample.pop("lips") if teacher else np.zeros(sample["source"].shape[-2:], np.float32)
            sample["teacher_mask"] = torch.from_numpy(lips)[None]
            return sample
        return self.reenactment_pair(rng)

    def reenactment_pair(self, rng) -> dict:
        if rng.random() < self.portrait_pair_prob:
            portrait = self.portraits[rng.integers(len(self.portraits))]
            source, lm_source = portrait.image(), portrait.landmarks
            driving, lm_driving = synthetic_driving(source, lm_source, rng)
            valid = np.full(source.shape[:2], 255, np.uint8)
        else:
            # Drawn only when asked for, so runs without closing pairs keep their random pairs.
            closing = self.closing_pair_prob > 0 and rng.random() < self.closing_pair_prob
            clip, i, j = self.random_closing_pair(rng) if closing else self.random_clip_pair(rng)
            source, lm_source = clip.frame(i), np.array(clip.landmarks[i])
            driving, lm_driving, valid = reframe(
                clip.frame(j), np.array(clip.landmarks[j]), clip.matrices[j], clip.matrices[i]
            )
        return self.make_sample(source, driving, lm_source, lm_driving, valid, rng)

    def cross_identity_pair(self, rng) -> dict:
        """A face moved by another pair's motion, as the pipeline moves a portrait: half the time one of the portraits
        (when portrait pairs are on and `teacher_from_portraits`), otherwise a training frame (half of those with the
        mouth wide open, when the clips have such frames); the driver's eyes and lips in the hybrid, its mesh offsets
        applied to the face's mesh; a quarter of the time held still (its own hybrid, no offsets), as a portrait is
        drawn at rest. No target (nothing valid), but the moved mesh's lips (`lips`) for the teacher."""
        if self.teacher_from_portraits and self.portraits and rng.random() < 0.5:
            portrait = self.portraits[rng.integers(len(self.portraits))]
            source, lm_source = portrait.image(), np.array(portrait.landmarks)
        else:
            opened = self.closing and rng.random() < 0.5
            clip, i, _ = self.random_closing_pair(rng) if opened else self.random_clip_pair(rng)
            source, lm_source = clip.frame(i), np.array(clip.landmarks[i])
        if rng.random() < 0.25:
            driving, lm_driving, hybrid_landmarks = source, lm_source, lm_source
        else:
            driver, a, b = self.random_clip_pair(rng)
            driving, hybrid_landmarks, _ = reframe(
                driver.frame(b), np.array(driver.landmarks[b]), driver.matrices[b], driver.matrices[a]
            )
            lm_driving = retarget_landmarks(lm_source, hybrid_landmarks, np.array(driver.landmarks[a]))
        nothing_valid = np.zeros(source.shape[:2], np.uint8)
        return self.make_sample(source, driving, lm_source, lm_driving, nothing_valid, rng, hybrid_landmarks)

    def make_sample(self, source, driving, lm_source, lm_driving, valid, rng, hybrid_landmarks=None) -> dict:
        matrix = random_framing(self.size, rng)  # the same framing change for both frames
        framed, driving = (
            cv2.warpAffine(x, matrix, (self.size,) * 2, borderMode=cv2.BORDER_REPLICATE) for x in (source, driving)
        )
        valid = cv2.warpAffine(valid, matrix, (self.size,) * 2, flags=cv2.INTER_NEAREST)
        lm_source, lm_driving = apply_matrix(lm_source, matrix), apply_matrix(lm_driving, matrix)
        framed, driving = colour_jitter([framed, driving], rng)
        person = self.person_mask(source, matrix, framed) if self.person_prior else None
        sample = pair_tensors(
            framed, driving, lm_source, lm_driving, valid, self.resolution, self.landmark_basis,
            self.with_optical_flow, person, self.warp_lock_margin, self.head_motion,
            None if hybrid_landmarks is None else apply_matrix(hybrid_landmarks, matrix),
        )  # fmt: skip
        if hybrid_landmarks is not None:
            sample["lips"] = lips_mask(lm_driving, self.size, self.resolution)
        return sample

    def person_mask(self, source: np.ndarray, framing: np.ndarray, augmented: np.ndarray) -> np.ndarray:
        """The person mask of the augmented source frame (`source` moved by the affine `framing`, colours
        jittered): MediaPipe's on it. (`remote_gpu.py`, without MediaPipe, warps a stored mask of `source`.)"""
        return self.processor().person_mask(augmented)

    def processor(self) -> FaceProcessor:
        if self._processor is None:
            self._processor = FaceProcessor()
        return self._processor


def one_opencv_thread(worker_id: int) -> None:
    """Loader workers share the cores with each other and the training process. A spawned worker starts with
    OpenCV's default pool (every core), not the one thread the dataset set in the process that built it."""
    cv2.setNumThreads(1)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, spawn: bool) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=True,
        multiprocessing_context="spawn" if spawn and num_workers > 0 else None, worker_init_fn=one_opencv_thread,
    )  # fmt: skip


def closing_frames(clips, open_above: float = 0.2, closed_below: float = 0.03) -> list[tuple]:
    """(clip, open frame indices, closed frame indices) of every clip with both a wide-open mouth and closed lips
    (MediaPipe's inner-lip gap in inter-ocular distances, `mouth_aperture`)."""
    found = []
    for clip in clips:
        gap = mouth_aperture(np.asarray(clip.landmarks))
        opened, closed = np.flatnonzero(gap > open_above), np.flatnonzero(gap < closed_below)
        if len(opened) and len(closed):
            found.append((clip, opened, closed))
    return found


def reframe(driving, lm_driving, driving_matrix, source_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A driving crop moved into the source frame's crop: (image, landmarks, valid mask uint8 0/255). Pixels the
    driving crop does not cover are black and invalid (eroded by 2 px against interpolated borders)."""
    size = driving.shape[0]
    matrix = crop_to_crop(driving_matrix, source_matrix)
    image = cv2.warpAffine(driving, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    valid = cv2.warpAffine(np.full((size, size), 255, np.uint8), matrix, (size, size), flags=cv2.INTER_NEAREST)
    valid = cv2.erode(valid, np.ones((5, 5), np.uint8))
    return image, apply_matrix(lm_driving, matrix), valid


def pair_tensors(
    source,
    driving,
    lm_source,
    lm_driving,
    valid,
    resolution: int,
    landmark_basis=None,
    with_optical_flow=False,
    person_mask=None,
    warp_lock_margin=None,
    head_motion="affine",
    hybrid_landmarks=None,
) -> dict:
    """The renderer's inputs, target and supervision for one pair: both frames and the valid mask at `resolution`,
    both hybrid representations at the crop size (the motion encoder resizes them, as in the pipeline), the
    driving mesh's offsets from the source's, the prior flow of the mesh the motion encoder can represent
    (offsets projected on `landmark_basis` [k, N·3] when given), the exact mesh flow with its mask, and when asked the
    optical flow of the two frames with its mask (`optical_flow`; 5 ms a pair at 128²). The prior is carried over
    the source's `person_mask` when given (`prior_flow`, with `head_motion`); with `warp_lock_margin`, the face
    decoder's `warp_lock` of the same mesh. With `hybrid_landmarks` the driving image is another person's
    (cross-identity): its eyes and lips, at those landmarks, make the driving hybrid; `lm_driving` is the source's
    mesh moved by that person's motion."""
    size = source.shape[0]
    offsets = landmark_offsets(lm_driving, lm_source)
    encodable = lm_driving
    if landmark_basis is not None:
        projected = (offsets.reshape(-1) @ landmark_basis.T) @ landmark_basis
        encodable = apply_landmark_offsets(lm_source, projected.reshape(offsets.shape))
    prior, _ = prior_flow(lm_source, encodable, size, resolution, person_mask=person_mask, head_motion=head_motion)
    flow, mask = mesh_flow(lm_source, lm_driving, size, out_size=resolution)
    resize = lambda x: cv2.resize(x, (resolution,) * 2, interpolation=cv2.INTER_AREA)  # noqa: E731
    small_source, small_driving = resize(source), resize(driving)
    small_valid = (resize(valid) > 127).astype(np.float32)
    tensors = {
        "source": to_tensor(small_source),
        "driving": to_tensor(small_driving),
        "valid": torch.from_numpy(small_valid)[None],
        "source_hybrid": to_tensor(hybrid_representation(source, lm_source)),
        "driving_hybrid": to_tensor(
            hybrid_representation(driving, lm_driving if hybrid_landmarks is None else hybrid_landmarks)
        ),
        "driving_offsets": torch.from_numpy(offsets),
        "prior_flow": torch.from_numpy(prior),
        "mesh_flow": torch.from_numpy(flow),
        "mesh_mask": torch.from_numpy(mask)[None],
    }
    if warp_lock_margin is not None:
        tensors["warp_lock"] = torch.from_numpy(warp_lock(encodable, size, resolution, warp_lock_margin))[None]
    if with_optical_flow:
        optical, consistent = optical_flow(small_source, small_driving)
        tensors["optical_flow"] = torch.from_numpy(optical)
        tensors["optical_mask"] = torch.from_numpy(consistent * small_valid)[None]
    return tensors


def optical_flow(source: np.ndarray, driving: np.ndarray, tolerance: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Backward flow [2, r, r] from the driving frame to the source (for every driving pixel, where its content is
    in the source; normalised coordinates, as the flow estimator's) by OpenCV's DIS optical flow on the two uint8
    frames [r, r, 3], and the mask [r, r] of pixels where the flows both ways agree within `tolerance` pixels
    (elsewhere it is occluded or unreliable)."""
    size = source.shape[0]
    grey = [cv2.cvtColor(x, cv2.COLOR_RGB2GRAY) for x in (source, driving)]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    backward = dis.calc(grey[1], grey[0], None)  # driving pixel -> source pixel
    forward = dis.calc(grey[0], grey[1], None)
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size)), axis=-1).astype(np.float32)
    target = grid + backward
    returned = cv2.remap(forward, target[..., 0], target[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = np.all((target >= 0) & (target <= size - 1), axis=-1)
    consistent = (np.linalg.norm(backward + returned, axis=-1) < tolerance) & inside
    return (backward.transpose(2, 0, 1) * (2.0 / size)).astype(np.float32), consistent.astype(np.float32)


def random_framing(size: int, rng) -> np.ndarray:
    """Zoom and shift of the crop (2x3 affine), applied identically to source and driving."""
    scale = rng.uniform(0.9, 1.1)
    shift = rng.uniform(-0.05, 0.05, size=2) * size
    centre = size / 2
    return np.array(
        [[scale, 0, centre - scale * centre + shift[0]], [0, scale, centre - scale * centre + shift[1]]],
        dtype=np.float64,
    )


def colour_jitter(images: list[np.ndarray], rng) -> list[np.ndarray]:
    """The same brightness, contrast, saturation and per-channel gain for every image of a pair: one affine colour
    map (grey = channel mean), applied by OpenCV in one pass (the loader's costliest step when done in float)."""
    brightness, contrast, saturation = rng.uniform(-0.1, 0.1), rng.uniform(0.8, 1.2), rng.uniform(0.7, 1.3)
    gains = rng.uniform(0.93, 1.07, size=3)
    matrix = np.empty((3, 4))
    matrix[:, :3] = gains[:, None] * contrast * (saturation * np.eye(3) + (1 - saturation) / 3)
    matrix[:, 3] = gains * (0.5 - 0.5 * contrast + brightness) * 255
    return [cv2.transform(image, matrix) for image in images]


def synthetic_driving(image: np.ndarray, landmarks: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """The portrait moved by a random small head motion (the whole image) and a random expression change
    (the face mesh locally: jaw and lips down, mouth corners out or in, eyelids), with its new landmarks."""
    size = image.shape[0]
    centre = landmarks[:, :2].mean(axis=0)
    angle, scale = rng.uniform(-8, 8), rng.uniform(0.95, 1.05)
    head = cv2.getRotationMatrix2D(tuple(map(float, centre)), angle, scale)
    head[:, 2] += rng.uniform(-0.04, 0.04, size=2) * size
    moved = cv2.warpAffine(image, head, (size, size), borderMode=cv2.BORDER_REPLICATE)
    lm_moved = apply_matrix(landmarks, head)

    xy = lm_moved[:, :2]
    face_height = np.ptp(xy[:, 1])
    mouth = xy[[13, 14]].mean(axis=0)  # inner lip midpoints
    # Below the mouth, points move down in proportion to how far below they are (jaw opening).
    below = np.clip((xy[:, 1] - mouth[1]) / (0.35 * face_height), 0, 1)
    target = lm_moved.copy()
    target[:, 1] += below * rng.uniform(0, 0.08) * face_height
    # Mouth corners spread or narrow (smile / pucker), fading with distance from the mouth.
    near_mouth = np.exp(-np.sum((xy - mouth) ** 2, axis=1) / (0.15 * face_height) ** 2)
    target[:, 0] += near_mouth * (xy[:, 0] - mouth[0]) * rng.uniform(-0.15, 0.2)
    return mesh_warp(moved, lm_moved, target), target


# Models --------------------------------------------------------------------------------------------


class Renderer(nn.Module):
    """The four networks of the face renderer as one module, so that accelerate wraps them together."""

    def __init__(self, components: dict):
        super().__init__()
        for name, module in components.items():
            self.add_module(name, module)

    def forward(self, source, source_hybrid, driving_hybrid, driving_offsets, prior_flow, warp_lock=None):
        offsets = torch.cat([torch.zeros_like(driving_offsets), driving_offsets])  # the source is its own reference
        latents = self.motion_encoder(torch.cat([source_hybrid, driving_hybrid]), offsets)
        source_latent, driving_latent = latents.chunk(2)
        features = self.appearance_encoder(source)
        flow = self.flow_estimator(source_latent, driving_latent, features, prior_flow)
        decoded = self.face_decoder(features, flow.flow, flow.occlusion, source, warp_lock)
        return decoded, flow


class PatchDiscriminator(nn.Module):
    def __init__(self, channels=(32, 64, 128, 256)):
        super().__init__()
        layers, in_channels = [], 3
        for i, out_channels in enumerate(channels):
            stride = 2 if i < len(channels) - 1 else 1
            conv = nn.utils.parametrizations.spectral_norm(nn.Conv2d(in_channels, out_channels, 4, stride, 1))
            layers.append(nn.Sequential(conv, nn.LeakyReLU(0.2)))
            in_channels = out_channels
        self.layers = nn.ModuleList(layers)
        self.head = nn.utils.parametrizations.spectral_norm(nn.Conv2d(in_channels, 1, 4, 1, 1))

    def forward(self, image) -> list[torch.Tensor]:
        features = []
        for layer in self.layers:
            image = layer(image)
            features.append(image)
        return [*features, self.head(image)]


class MultiScaleDiscriminator(nn.Module):
    """Patch discriminators on the image and on its half-resolution copy; each returns its features and logits."""

    def __init__(self, num_scales: int = 2):
        super().__init__()
        self.discriminators = nn.ModuleList(PatchDiscriminator() for _ in range(num_scales))

    def forward(self, image) -> list[list[torch.Tensor]]:
        outputs = []
        for discriminator in self.discriminators:
            outputs.append(discriminator(image))
            image = F.avg_pool2d(image, 2)
        return outputs


def load_renderer(folder) -> dict:
    """The renderer's components from a pipeline folder (`--init_from`, `--teacher`)."""
    return {name: component_class(name).from_pretrained(folder, subfolder=name) for name in RENDERER}


def build_renderer(args) -> dict:
    if args.init_from:
        return load_renderer(args.init_from)
    components = {}
    for name in RENDERER:
        config = component_config(name, args.renderer)
        if name == "appearance_encoder":
            config["sample_size"] = args.resolution
        components[name] = component_class(name)(**config)
    return components


# Training ------------------------------------------------------------------------------------------


def render_batch(renderer, batch):
    inputs = ("source", "source_hybrid", "driving_hybrid", "driving_offsets", "prior_flow")
    return renderer(*(batch[name] for name in inputs), batch.get("warp_lock"))


def fill_invalid(target, output, valid):
    """The target with the output (detached) where the driving frame has no pixels, so losses ignore those."""
    return target * valid + output.detach() * (1 - valid)


def masked_l1(prediction, target, mask):
    return ((prediction - target).abs() * mask).sum() / (mask.sum() * prediction.shape[1]).clamp_min(1.0)


def has_real_frame(batch: dict) -> torch.Tensor:
    """[B] 1 for the pairs whose driving frame is real, 0 for cross-identity pairs: the target the discriminator
    sees there is the output itself, so they are left out of the adversarial losses."""
    return (batch["valid"].flatten(1).amax(dim=1) > 0).float()


def mean_over(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` [B, ...] over the pairs weighted 1 in `weights` [B] (with all of them: the plain mean)."""
    per_pair = values.flatten(1).float().mean(dim=1)
    return (per_pair * weights).sum() / weights.sum().clamp_min(1.0)


def teacher_loss(teacher: Renderer, batch: dict, output: torch.Tensor) -> torch.Tensor:
    """L1 between the output and the teacher's rendering of the same inputs over the batch's `teacher_mask` (the
    lips of its cross-identity pairs); zero when the batch has none."""
    chosen = batch["teacher_mask"].flatten(1).amax(dim=1) > 0
    if not chosen.any():
        return output.sum() * 0.0  # in the graph all the same, so every process's backward looks alike
    with torch.no_grad():
        kept = render_batch(teacher, {k: v[chosen] for k, v in batch.items()})[0].sample
    return masked_l1(output[chosen], kept.to(output.dtype), batch["teacher_mask"][chosen])


def flow_to_rgb(flow: torch.Tensor) -> np.ndarray:
    """[2, h, w] flow → uint8 colour image (hue: direction, brightness: magnitude) for the validation grid."""
    dx, dy = flow[0].float().cpu().numpy(), flow[1].float().cpu().numpy()
    magnitude, angle = cv2.cartToPolar(dx, dy)
    hsv = np.zeros((*dx.shape, 3), np.uint8)
    hsv[..., 0] = (angle * 90 / np.pi).astype(np.uint8)
    hsv[..., 1] = 255
    hsv[..., 2] = np.clip(magnitude / 0.2 * 255, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def validate(renderer, batch, step: int, output_dir: Path) -> dict:
    """Reconstruction figures on fixed validation pairs and a grid image: source | driving | output | flow | blend."""
    renderer.eval()
    decoded, flow = render_batch(renderer, batch)
    renderer.train()
    output = (decoded.sample.clamp(-1, 1) + 1) / 2
    target = (fill_invalid(batch["driving"], decoded.sample, batch["valid"]).clamp(-1, 1) + 1) / 2
    size = output.shape[-1]
    rows = []
    for k in range(output.shape[0]):
        tiles = [to_uint8(batch["source"][k]), to_uint8(batch["driving"][k]), to_uint8(decoded.sample[k])]
        tiles.append(cv2.resize(flow_to_rgb(flow.flow[k]), (size, size), interpolation=cv2.INTER_NEAREST))
        tiles.append(np.repeat(to_uint8(decoded.blend[k] * 2 - 1), 3, axis=2))
        rows.append(np.concatenate(tiles, axis=1))
    grid_dir = output_dir / "validation"
    grid_dir.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(grid_dir / f"step-{step:06d}.jpg"), cv2.cvtColor(np.concatenate(rows), cv2.COLOR_RGB2BGR))
    return {"val_ssim": ssim(output, target).mean().item(), "val_psnr": psnr(output, target).mean().item()}


def fixed_validation_batch(
    data: PreparedDataset,
    args,
    landmark_basis,
    person_prior: bool = False,
    warp_lock_margin=None,
    head_motion: str = "affine",
    count: int = 6,
) -> dict | None:
    """Pairs (first frame → a frame further on, in the first frame's crop) spread over the val clips, without
    augmentation."""
    clips = [c for c in data.clips(kinds=["talking"], splits=["val"]) if c.num_frames >= 2]
    if not clips:
        return None
    per_clip = -(-count // len(clips))
    positions = np.linspace(0, 1, per_clip + 2)[1:-1]
    samples = []
    with FaceProcessor() as processor:  # closed before the loader's workers fork
        for k in range(count):
            clip = clips[k % len(clips)]
            j = max(1, int(positions[k // len(clips)] * (clip.num_frames - 1)))
            driving, lm_driving, valid = reframe(
                clip.frame(j), np.array(clip.landmarks[j]), clip.matrices[j], clip.matrices[0]
            )
            source = clip.frame(0)
            person = processor.person_mask(source) if person_prior else None
            samples.append(
                pair_tensors(
                    source,
                    driving,
                    np.array(clip.landmarks[0]),
                    lm_driving,
                    valid,
                    args.resolution,
                    landmark_basis,
                    person_mask=person,
                    warp_lock_margin=warp_lock_margin,
                    head_motion=head_motion,
                )  # fmt: skip
            )
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def export_pipeline(renderer: Renderer, folder: Path, dtype=torch.float16) -> None:
    """Write the renderer as a stage-1 pipeline folder (no motion model yet; Whisper converted on load)."""
    components = {name: getattr(renderer, name) for name in RENDERER}
    pipe = INFPPipeline(
        audio_encoder=component_class("audio_encoder")(**component_config("audio_encoder", "base")),
        motion_guider=None,
        motion_transformer=None,
        scheduler=make_scheduler(),
        **components,
    )
    if folder.exists():
        shutil.rmtree(folder)
    export_for_hub(pipe, folder, torch_dtype=dtype)


def checkpoints(output_dir: Path) -> list[Path]:
    """The run's `checkpoint-<step>` folders, oldest first."""
    return sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def make_accelerator(args, output_dir: Path) -> Accelerator:
    """The run's Accelerator (mixed precision, trackers, project folder) from the script's arguments."""
    return Accelerator(
        # Without a GPU, processes started by torchrun (`accelerate launch --multi_gpu`) form a gloo CPU group.
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> None:
    """`accelerator.save_state` to `checkpoint-<step>`, keeping only the newest `keep` checkpoints."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        existing = checkpoints(output_dir)
        for old in existing[: max(0, len(existing) - keep + 1)]:
            shutil.rmtree(old)
    accelerator.save_state(str(output_dir / f"checkpoint-{step}"))


def resume(accelerator: Accelerator, resume_from: str | None, output_dir: Path) -> int:
    """Load the state of a checkpoint folder or of the newest one ("latest"); returns its step (0: none)."""
    if not resume_from:
        return 0
    path = next(reversed(checkpoints(output_dir)), None) if resume_from == "latest" else Path(resume_from)
    if path is None:
        logger.info("No checkpoint in %s: starting from scratch.", output_dir)
        return 0
    accelerator.load_state(str(path))
    logger.info("Resumed from %s", path)
    return int(path.name.split("-")[1])


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    if args.report_to:
        accelerator.init_trackers("head_imitation", config={k: v for k, v in vars(args).items() if v is not None})

    data = PreparedDataset(args.data_dir)
    # Every index draws its own random pair, so a sequential sampler is enough and shards cleanly across processes.
    dataset = HeadImitationDataset(
        data, args.kinds, "train", args.resolution, args.portrait_pair_prob, args.seed,
        length=args.max_train_steps * args.train_batch_size * accelerator.num_processes,
        closing_pair_prob=args.closing_pair_prob, with_optical_flow=args.optical_flow_weight > 0,
        teacher_pair_prob=args.teacher_pair_prob, teacher_from_portraits=args.teacher_sources == "frames+portraits",
    )  # fmt: skip
    renderer = Renderer(build_renderer(args))
    teacher = None
    if args.teacher_pair_prob > 0:
        teacher = Renderer(load_renderer(args.teacher or args.init_from))
        teacher.requires_grad_(False).eval().to(accelerator.device)
    person_prior = args.person_prior or renderer.flow_estimator.config.person_prior
    head_motion = args.head_motion or renderer.flow_estimator.config.head_motion
    renderer.flow_estimator.register_to_config(person_prior=person_prior, head_motion=head_motion)
    lock_margin = args.warp_lock_margin
    if lock_margin is None:
        lock_margin = renderer.face_decoder.config.warp_lock_margin
    renderer.face_decoder.register_to_config(warp_lock_margin=lock_margin)
    # MediaPipe's graphs do not survive a fork of a process that has run one: spawn the loader's workers then.
    loader = make_loader(dataset, args.train_batch_size, args.dataloader_num_workers, spawn=person_prior)
    if not args.init_from and not args.resume_from_checkpoint:
        samples = torch.from_numpy(dataset.landmark_offset_samples(args.basis_samples, args.seed))
        kept = renderer.motion_encoder.fit_landmark_basis(samples)
        logger.info("Landmark basis fitted on %d pairs: it keeps %.2f%% of the motion", len(samples), 100 * kept)
    for name in args.freeze:
        getattr(renderer, name).requires_grad_(False)
    trainable = [p for p in renderer.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"--freeze {' '.join(args.freeze)} leaves nothing to train.")
    discriminator = MultiScaleDiscriminator()
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, betas=(0.5, 0.999), weight_decay=1e-4)
    optimizer_d = torch.optim.AdamW(discriminator.parameters(), lr=args.learning_rate, betas=(0.5, 0.999))
    renderer, discriminator, optimizer, optimizer_d, loader = accelerator.prepare(
        renderer, discriminator, optimizer, optimizer_d, loader
    )

    global_step = resume(accelerator, args.resume_from_checkpoint, output_dir)
    dataset.resumed_at = global_step  # new random draws, and the dataset knows how far training is
    dataset.landmark_basis = accelerator.unwrap_model(renderer).motion_encoder.landmark_basis.cpu().numpy()
    dataset.person_prior, dataset.head_motion, dataset.warp_lock_margin = person_prior, head_motion, lock_margin
    validation_batch = fixed_validation_batch(
        data, args, dataset.landmark_basis, person_prior, lock_margin, head_motion
    )

    logger.info(
        "Training on %d clips (+%d portraits), %d steps of %d x %d processes",
        len(dataset.clips), len(dataset.portraits), args.max_train_steps, args.train_batch_size,
        accelerator.num_processes,
    )  # fmt: skip
    progress = tqdm(range(args.max_train_steps), initial=global_step, disable=not accelerator.is_local_main_process)
    start, first_step = time.perf_counter(), global_step
    waiting = 0.0  # for the data loader: when it is most of the time, more workers (or cores) buy steps
    data_iter = iter(loader)
    while global_step < args.max_train_steps:
        fetch = time.perf_counter()
        batch = next(data_iter)
        waiting += time.perf_counter() - fetch
        flow_weight = args.flow_weight + (args.flow_weight_final - args.flow_weight) * min(
            1.0, global_step / max(1, args.max_train_steps)
        )
        use_gan = args.gan_weight > 0 and global_step >= args.gan_start_step
        real = has_real_frame(batch) if use_gan else None  # the pairs the adversarial losses count

        with accelerator.autocast():
            decoded, flow = render_batch(renderer, batch)
            output = decoded.sample
            target = fill_invalid(batch["driving"], output, batch["valid"])
            l1 = F.l1_loss(output, target)
            ssim_loss = 1 - ssim((output.float().clamp(-1, 1) + 1) / 2, (target.float() + 1) / 2).mean()
            flow_loss = masked_l1(flow.flow.float(), batch["mesh_flow"], batch["mesh_mask"])
            loss = l1 + args.ssim_weight * ssim_loss + flow_weight * flow_loss
            logs = {"l1": l1.item(), "ssim": 1 - ssim_loss.item(), "flow": flow_loss.item()}
            if args.optical_flow_weight > 0:
                outside_mesh = batch["optical_mask"] * (1 - batch["mesh_mask"])
                optical_loss = masked_l1(flow.flow.float(), batch["optical_flow"], outside_mesh)
                loss = loss + args.optical_flow_weight * optical_loss
                logs["optical_flow"] = optical_loss.item()
            if teacher is not None:
                kept = teacher_loss(teacher, batch, output)
                loss = loss + args.teacher_weight * kept
                logs["teacher"] = kept.item()
            if use_gan:
                # One discriminator pass over fake and real halves (DDP wants one forward per backward).
                scales = discriminator(torch.cat([output, target]))
                half = output.shape[0]
                adversarial = sum(mean_over(real, -scale[-1][:half]) for scale in scales)
                matching = sum(
                    mean_over(real, (f[:half] - f[half:].detach()).abs()) for scale in scales for f in scale[:-1]
                )
                loss = loss + args.gan_weight * adversarial + args.feature_matching_weight * matching
                logs.update(g_adv=adversarial.item(), feature_matching=matching.item())
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()

        if use_gan:
            with accelerator.autocast():
                scales = discriminator(torch.cat([target, output.detach()]))
                half = output.shape[0]
                loss_d = sum(
                    mean_over(real, F.relu(1 - logits[:half])) + mean_over(real, F.relu(1 + logits[half:]))
                    for logits in (scale[-1] for scale in scales)
                )
            optimizer_d.zero_grad(set_to_none=True)
            accelerator.backward(loss_d)
            optimizer_d.step()
            logs["d"] = loss_d.item()

        global_step += 1
        progress.update(1)
        logs["loss"] = loss.item()
        progress.set_postfix(**{k: f"{v:.3f}" for k, v in logs.items() if k in ("loss", "ssim", "flow")})
        accelerator.log(logs, step=global_step)

        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)
            if accelerator.is_main_process:  # the latest renderer, ready for the evaluation command
                export_pipeline(copy.deepcopy(accelerator.unwrap_model(renderer)), output_dir / "pipeline")
        if (
            validation_batch is not None
            and accelerator.is_main_process
            and (global_step % args.validation_steps == 0 or global_step == args.max_train_steps)
        ):
            device_batch = {k: v.to(accelerator.device) for k, v in validation_batch.items()}
            figures = validate(accelerator.unwrap_model(renderer), device_batch, global_step, output_dir)
            elapsed = time.perf_counter() - start
            logger.info("step %d: %s (%.0f s)", global_step, {k: round(v, 4) for k, v in figures.items()}, elapsed)
            accelerator.log(figures, step=global_step)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.export_to:
            export_pipeline(accelerator.unwrap_model(renderer), Path(args.export_to))
            logger.info("Wrote the renderer pipeline to %s", args.export_to)
        samples = (global_step - first_step) * args.train_batch_size * accelerator.num_processes
        elapsed = max(1e-9, time.perf_counter() - start)
        logger.info("Done: %d steps in %.1f min (%.1f samples/s, %.0f %% of the time waiting for the data loader)",
                    global_step, elapsed / 60, samples / elapsed, 100 * waiting / elapsed)  # fmt: skip
    accelerator.end_training()


if __name__ == "__main__":
    main()
