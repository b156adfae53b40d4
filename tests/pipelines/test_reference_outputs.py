"""Fixed-seed outputs are pinned, so that speed work (batching, threads, memory formats, fewer copies) cannot change
what the pipeline makes unnoticed. A deliberate change of the models, the weights or the sampling regenerates the
references, and the commit says why:

    INFP_UPDATE_REFERENCES=1 python -m pytest tests/pipelines/test_reference_outputs.py

Tolerances: motion latents within 1e-4 + 1e-3 relative; frames (compared as 16x16 thumbnails, 0-255) within 1 on
average and 8 at most. Float reordering (other BLAS kernels, thread counts, batch sizes) stays far inside them; a
change of the computation does not.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_infp import INFPPipeline
from pipeline_infp.processing import SAMPLE_RATE, FaceProcessor, load_audio
from tests.pipelines.test_pipeline_infp import speech
from tests.utils import tiny_random_pipeline

REFERENCES = Path(__file__).parent / "references"
REPO = Path(__file__).resolve().parents[2]
UPDATE = os.environ.get("INFP_UPDATE_REFERENCES") == "1"


def thumbnails(frames: np.ndarray, size: int = 16) -> np.ndarray:
    """Frames [T, S, S, 3] in [0, 1] → block means [T, size, size, 3], uint8."""
    count, side = frames.shape[0], frames.shape[1]
    blocks = frames.reshape(count, size, side // size, size, side // size, 3).mean(axis=(2, 4))
    return (blocks * 255).round().astype(np.uint8)


def check_or_update(name: str, outputs: dict[str, np.ndarray]) -> None:
    path = REFERENCES / f"{name}.npz"
    if UPDATE:
        REFERENCES.mkdir(exist_ok=True)
        np.savez_compressed(path, **outputs)
        pytest.skip(f"wrote {path}")
    reference = np.load(path)
    assert sorted(reference.files) == sorted(outputs)
    for key, value in outputs.items():
        if key.endswith("frames"):
            difference = np.abs(value.astype(np.float32) - reference[key])
            assert difference.mean() < 1 and difference.max() < 8, f"{key}: mean {difference.mean():.3f}"
        else:
            np.testing.assert_allclose(value, reference[key], atol=1e-4, rtol=1e-3, err_msg=key)


def test_tiny_pipeline_makes_what_it_made(shared_data):
    pipe = tiny_random_pipeline()
    with FaceProcessor() as processor:
        face = processor.crop_portrait(shared_data / "portraits" / "liveportrait-source-s1.jpg", size=64)
    own, partner = speech(1.37, seed=0), speech(1.37, seed=1)
    settings = dict(num_inference_steps=3, image_size=64)
    out = pipe(face, own, partner, generator=torch.Generator().manual_seed(0), output_type="np", **settings)
    chunks = [(own[i : i + 4800], partner[i : i + 4800]) for i in range(0, len(own), 4800)]
    streamed = list(pipe.stream(face, chunks, generator=torch.Generator().manual_seed(0), **settings))
    check_or_update(
        "tiny",
        {
            "latents": out.motion_latents.numpy(),
            "frames": thumbnails(out.frames),
            "stream_latents": torch.cat([piece.motion_latents for piece in streamed]).numpy(),
            "stream_frames": thumbnails(np.concatenate([piece.frames for piece in streamed])),
        },
    )


def test_bundled_checkpoint_makes_what_it_made():
    """3 s: two overlapping windows, so joining them is pinned too."""
    pipe = INFPPipeline.from_pretrained(REPO / "checkpoints" / "infp-base")
    pipe.set_progress_bar_config(disable=True)
    own, partner = (
        load_audio(REPO / "examples" / f"conversation-{who}.wav")[: 3 * SAMPLE_RATE] for who in ("man", "woman")
    )
    out = pipe(
        str(REPO / "examples" / "portrait-s1.jpg"), own, partner, num_inference_steps=10,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )  # fmt: skip
    check_or_update("infp-base", {"latents": out.motion_latents.numpy(), "frames": thumbnails(out.frames)})
