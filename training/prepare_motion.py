#!/usr/bin/env python
"""Stage-2 data: motion latents and Whisper features for a dataset written by prepare_data.py.

    python training/prepare_motion.py --data_dir prepared --checkpoint checkpoints/infp-base

For every clip of the chosen kinds (default: talking, dyadic-split, nonverbal):
  * `latents.npy` float32 [T, latent_dim]: the motion latent of every kept frame from the checkpoint's motion
    encoder. All frames are cut with the crop of one reference frame (the clip's most closed mouth near its
    usual head position), and the mesh motion is taken relative to that frame: the generated motion is then
    relative to a neutral face, as the portrait's is at inference;
  * `whisper.npy` float16 [timeline_frames, feature_dim]: the clip's own audio through the frozen Whisper
    encoder at 25 fps (clips without audio get none: their own track is silence).
Each talking clip's audio-video offset (`av_sync.py`: a sync expert fitted on the other identities' clips), in
`motion.json` as `av_offset` (frames; the sound of frame t lies at audio frame t + av_offset): train_motion.py reads
the clip's own track shifted by it, so off-sync footage does not teach lips that run ahead of or behind the voice.
For every audio track of the dataset (`speech`, `dual-audio`, ...): `audio/<id>.whisper.npy` likewise, and
`silence.whisper.npy`: 60 s of silence (features of silence depend on where they sit in Whisper's window).

Everything lands in `<data_dir>/motion/` (or `--out`), with `motion.json` recording which motion encoder made
the latents: when the renderer changes (its motion encoder's weights differ), the latents are recomputed;
Whisper features are kept. It also records a hash of each prepared clip's files: a clip prepared again
(`prepare_data.py --overwrite`) gets both recomputed. Re-runs skip finished clips, so an interrupted run
resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from av_sync import SyncClip, estimate_offsets  # noqa: E402

from pipeline_infp import INFPPipeline  # noqa: E402
from pipeline_infp.processing import apply_matrix, mouth_aperture  # noqa: E402
from pipeline_infp.processing.face import crop_to_crop, warp_to_crop  # noqa: E402
from prepared import PreparedClip, PreparedDataset  # noqa: E402

logger = logging.getLogger("prepare_motion")
SILENCE_SECONDS = 60.0
SPEAKING_KINDS = ("talking", "dyadic-split")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="a dataset written by training/prepare_data.py")
    parser.add_argument("--checkpoint", required=True, help="pipeline folder with the trained motion encoder")
    parser.add_argument("--out", help="output folder (default: <data_dir>/motion)")
    parser.add_argument("--kinds", nargs="+", default=["talking", "dyadic-split", "nonverbal"])
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--max_av_offset", type=int, default=6, help="largest audio-video offset searched, in frames (0: none)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def reference_frame(clip: PreparedClip) -> int:
    """The kept frame with the most closed mouth among the half of the frames whose face centre lies nearest
    the clip's median (in source-frame pixels), so the reference is neutral and typical."""
    centres = np.stack(
        [
            apply_matrix(lm[:, :2].mean(0, keepdims=True), cv2.invertAffineTransform(np.float64(m)))[0]
            for lm, m in zip(clip.landmarks, clip.matrices)
        ]
    )
    spread = np.linalg.norm(centres - np.median(centres, axis=0), axis=1)
    typical = spread <= np.quantile(spread, 0.5)
    apertures = np.where(typical, mouth_aperture(np.asarray(clip.landmarks)), np.inf)
    return int(np.argmin(apertures))


@torch.no_grad()
def clip_latents(pipe: INFPPipeline, clip: PreparedClip, reference: int, batch_size: int) -> np.ndarray:
    """Motion latents [T, latent_dim] of every kept frame, cut with the reference frame's crop."""
    size = clip.frame(0).shape[0]
    target = clip.matrices[reference]
    reference_landmarks = apply_matrix(clip.landmarks[reference], crop_to_crop(clip.matrices[reference], target))
    out = []
    for start in range(0, clip.num_frames, batch_size):
        positions = range(start, min(start + batch_size, clip.num_frames))
        crops, landmarks = [], []
        for i in positions:
            matrix = crop_to_crop(clip.matrices[i], target)
            crops.append(warp_to_crop(clip.frame(i), matrix, size))
            landmarks.append(apply_matrix(clip.landmarks[i], matrix))
        latents = pipe.encode_motion(np.stack(crops), np.stack(landmarks), reference_landmarks)
        out.append(latents.float().cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def whisper_features(pipe: INFPPipeline, audio: np.ndarray, num_frames: int) -> np.ndarray:
    waveform = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)).to(pipe.device)
    return pipe.audio_encoder(waveform[None], num_frames=num_frames)[0].to(torch.float16).cpu().numpy()


def _save(path: Path, array: np.ndarray) -> None:
    """Write through a temporary file, so an interrupted run never leaves a truncated array."""
    partial = path.with_name(path.name + ".partial.npy")
    np.save(partial, array)
    partial.replace(path)


def clip_hash(clip: PreparedClip) -> str:
    """What the clip's latents and features are computed from: its metadata, meshes and audio."""
    digest = hashlib.sha256()
    for name in ("meta.json", "landmarks.npy", "audio.wav"):
        if (clip.folder / name).is_file():
            digest.update((clip.folder / name).read_bytes())
    return digest.hexdigest()[:16]


def measure_av_offsets(clips: list[PreparedClip], out: Path, index: dict, max_offset: int) -> None:
    """`av_offset` (frames) and the sync expert's correlations into each talking clip's index entry."""
    talking = [c for c in clips if c.kind in SPEAKING_KINDS and (out / "clips" / c.id / "whisper.npy").is_file()]
    sync_clips = [
        SyncClip(c.id, c.identity, np.load(out / "clips" / c.id / "whisper.npy"), np.asarray(c.indices),
                 mouth_aperture(np.asarray(c.landmarks)))
        for c in talking
    ]  # fmt: skip
    results = estimate_offsets(sync_clips, max_offset) if max_offset > 0 else {}
    for clip in clips:
        entry = index["clips"][clip.id]
        result = results.get(clip.id)
        entry["av_offset"] = result.offset if result else 0
        entry.pop("av_sync", None)  # a run with --max_av_offset 0 leaves no earlier run's figures behind
        if result and result.curve:
            entry["av_sync"] = {
                "correlation": round(result.correlation, 3),
                "at_zero": round(result.correlation_at_zero, 3),
            }
    shifted = {c: r for c, r in results.items() if r.offset}
    logger.info(
        "Audio-video offsets: %d of %d talking clips shifted%s", len(shifted), len(results),
        "".join(f"\n  {c}: {r.offset:+d} frames (sync {r.correlation_at_zero:.2f} -> {r.correlation:.2f})"
                for c, r in sorted(shifted.items())),
    )  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data = PreparedDataset(args.data_dir)
    out = Path(args.out) if args.out else Path(args.data_dir) / "motion"
    pipe = INFPPipeline.from_pretrained(args.checkpoint).to(args.device)
    pipe.audio_encoder.to(torch.float32)  # Whisper in fp16 on a CPU is slow and no more exact
    fingerprint = pipe.motion_encoder.fingerprint()
    index_path = out / "motion.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    if index.get("motion_encoder") != fingerprint:
        index = {"motion_encoder": fingerprint, "clips": {}}  # another renderer: every latent is stale
    index.update(checkpoint=str(Path(args.checkpoint).resolve()), fps=data.fps)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(parents=True, exist_ok=True)

    clips = data.clips(kinds=args.kinds)
    for clip in tqdm(clips, desc="clips", unit="clip"):
        folder = out / "clips" / clip.id
        folder.mkdir(exist_ok=True)
        whisper_path = folder / "whisper.npy"
        source = clip_hash(clip)
        done = index["clips"].get(clip.id)
        if done is not None and done.get("source") != source:  # prepared again since: nothing here is valid
            whisper_path.unlink(missing_ok=True)
            done = None
        if clip.has_audio and not whisper_path.is_file():
            _save(whisper_path, whisper_features(pipe, clip.audio(), clip.timeline_frames))
        if done is not None and (folder / "latents.npy").is_file():
            continue
        reference = reference_frame(clip)
        _save(folder / "latents.npy", clip_latents(pipe, clip, reference, args.batch_size))
        index["clips"][clip.id] = {
            "kind": clip.kind, "split": clip.split, "reference_frame": reference, "source": source,
        }  # fmt: skip
        index_path.write_text(json.dumps(index, indent=1))  # after each clip: a resumed run skips it

    measure_av_offsets([c for c in clips if c.id in index["clips"]], out, index, args.max_av_offset)
    index_path.write_text(json.dumps(index, indent=1))

    for track in tqdm(data.audio_tracks(), desc="audio tracks", unit="track"):
        path = out / "audio" / f"{track.id}.whisper.npy"
        if not path.is_file():
            _save(path, whisper_features(pipe, track.audio(), len(track.vad)))  # one feature per VAD frame
    silence_path = out / "silence.whisper.npy"
    if not silence_path.is_file():
        frames = round(SILENCE_SECONDS * data.fps)
        _save(silence_path, whisper_features(pipe, np.zeros(round(SILENCE_SECONDS * 16000), np.float32), frames))
    index_path.write_text(json.dumps(index, indent=1))
    logger.info(
        "Motion data for %d clips and %d audio tracks in %s", len(index["clips"]), len(data.audio_tracks()), out
    )
    return index


if __name__ == "__main__":
    main()
