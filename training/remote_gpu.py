#!/usr/bin/env python
"""Stage-1 training on a rented GPU machine that takes a small upload and has no MediaPipe, diffusers or librosa
(written for, and used on, an H200 that took a 64 MiB upload).

Here (MediaPipe installed):
    python training/remote_gpu.py pack --data_dir prepared --out .carry/data --every 3
Upload the repository with `.carry/` and the diffusers wheel; there, with the wheel installed to /tmp/site:
    export PYTHONPATH=/tmp/site:$PWD/.carry/data/site:$PWD  # the package itself too: it is not installed there
    python training/remote_gpu.py unpack --packed .carry/data --out /tmp/prepared
    python training/remote_gpu.py train --time_budget 430 -- --data_dir /tmp/prepared --output_dir /tmp/head \\
        --config gpu --resolution 128 --init_from checkpoints/infp-base --freeze motion_encoder --person_prior ...
    python training/remote_gpu.py states --output_dir /tmp/head --out <what comes back> \\
        --components appearance_encoder flow_estimator
Back here, each state the in-training validation scored, as a pipeline folder to evaluate:
    python training/remote_gpu.py bundle --state checkpoint-1200.safetensors --base checkpoints/infp-base --out G1200

pack: every N-th frame of each training clip (the first `--val_frames` kept frames of each val clip, for the
validation grid) as an H.264 video at the renderer's working size (yuv444, crf 16: about 600 B a frame at 128²),
meshes to 1/32 px, delta-coded and lzma-compressed (about 1.3 KB a frame), the person masks `--person_prior` needs
(MediaPipe selfie segmentation, 64², about 0.4 KB a frame), portraits as they are; and under <out>/site MediaPipe's
face mesh topology module (pure Python), the only part of MediaPipe the training script needs besides the masks.
The shared data packs to 32 MB at --every 3 (12,152 frames), against 1.3 GB prepared.
unpack: a prepared dataset again (256² JPEG frames, float32 meshes) with each clip's masks in `person.npy`.
train: train_head_imitation.py, with person masks read from the unpacked dataset (warped by each pair's framing)
instead of computed by MediaPipe, an optional time budget (the loop ends, then the script exports as usual), and
the renderer's four components exported (fp16) instead of a whole pipeline, whose audio encoder needs librosa.
states: every `checkpoint-N` of the run as one fp16 file of the components trained (4.6 MB for the appearance
encoder and flow estimator), their configs in its metadata. bundle: a copy of a pipeline folder with those swapped in.
"""

import argparse
import copy
import importlib.util
import json
import lzma
import multiprocessing
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling training modules, also when imported
import train_head_imitation  # noqa: E402

import prepared  # noqa: E402

MESH_STEP = 32  # mesh coordinates are kept to 1/32 px
MASK_SIZE = 64


# Pack (where MediaPipe is) --------------------------------------------------------------------------


def _compress(array: np.ndarray) -> np.ndarray:
    return np.frombuffer(lzma.compress(np.ascontiguousarray(array).tobytes(), preset=9), np.uint8)


def _decompress(blob: np.ndarray, dtype, shape) -> np.ndarray:
    return np.frombuffer(lzma.decompress(blob.tobytes()), dtype).reshape(shape)


def pack_meshes(landmarks: np.ndarray) -> dict:
    steps = np.round(np.asarray(landmarks, np.float64) * MESH_STEP).astype(np.int64)
    deltas = np.diff(steps, axis=0, prepend=0)
    if np.abs(deltas).max(initial=0) > np.iinfo(np.int16).max:
        raise ValueError("A mesh moves more than 1000 px between kept frames: not a prepared crop's mesh.")
    return {"landmarks": _compress(deltas.astype(np.int16)), "landmarks_shape": np.array(landmarks.shape)}


def unpack_meshes(pack) -> np.ndarray:
    deltas = _decompress(pack["landmarks"], np.int16, tuple(pack["landmarks_shape"]))
    return (np.cumsum(deltas.astype(np.int64), axis=0) / MESH_STEP).astype(np.float32)


def person_masks(processor, images: list[np.ndarray]) -> np.ndarray:
    """uint8 [T, 64, 64]: MediaPipe's person masks of RGB images."""
    small = [cv2.resize(processor.person_mask(im), (MASK_SIZE,) * 2, interpolation=cv2.INTER_AREA) for im in images]
    return (np.stack(small) * 255).round().astype(np.uint8)


def write_video(path: Path, frames: list[np.ndarray], size: int) -> None:
    import imageio_ffmpeg

    writer = imageio_ffmpeg.write_frames(
        str(path), (size, size), fps=25, codec="libx264", pix_fmt_out="yuv444p",
        output_params=["-crf", "16", "-preset", "slow"], macro_block_size=1,
    )  # fmt: skip
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)))
    writer.close()


_processor = None


def _worker_processor():
    global _processor
    if _processor is None:
        from pipeline_infp.processing import FaceProcessor

        _processor = FaceProcessor()
    return _processor


def pack_clip(clip: prepared.PreparedClip, out: Path, keep: np.ndarray, frame_size: int) -> int:
    folder = out / "clips" / clip.id
    folder.mkdir(parents=True, exist_ok=True)
    images = [clip.frame(int(i)) for i in keep]
    write_video(folder / "frames.mp4", images, frame_size)
    np.savez(
        folder / "pack.npz",
        **pack_meshes(np.asarray(clip.landmarks)[keep]),
        matrices=np.asarray(clip.matrices)[keep],
        indices=np.asarray(clip.indices)[keep],
        person=_compress(person_masks(_worker_processor(), images)),
    )
    (folder / "meta.json").write_text(json.dumps({**clip.meta, "num_frames": len(keep)}, indent=1))
    return len(keep)


def _pack_one(job):
    root, clip_id, out, keep, frame_size = job
    return pack_clip(prepared.PreparedDataset(root).clip(clip_id), out, keep, frame_size)


def pack(args) -> None:
    data, out = prepared.PreparedDataset(args.data_dir), Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise FileExistsError(f"{out} exists and is not empty: choose a new folder, or pass --overwrite.")
        if out.resolve() in (data.root.resolve(), *data.root.resolve().parents):
            raise ValueError(f"--out {out} holds the dataset being packed: choose another folder.")
        shutil.rmtree(out)
    jobs, entries = [], []
    for clip in data.clips(kinds=args.kinds):
        keep = np.arange(0, clip.num_frames, args.every)
        keep = keep if clip.split == "train" else keep[: args.val_frames]  # val clips only feed the validation grid
        jobs.append((str(data.root), clip.id, out, keep, args.frame_size))
        entry = next(e for e in data.index["clips"] if e["id"] == clip.id)
        entries.append({**entry, "num_frames": len(keep)})
    # Spawned: MediaPipe's graphs do not survive a fork of a process that has run one.
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        frames = sum(pool.map(_pack_one, jobs))
    portraits = out / "portraits"
    portraits.mkdir(parents=True)
    processor = _worker_processor()
    for portrait in data.portraits():
        for suffix in (".jpg", ".npy", ".json"):
            shutil.copy(data.root / "portraits" / f"{portrait.id}{suffix}", portraits)
        np.save(portraits / f"{portrait.id}.person.npy", person_masks(processor, [portrait.image()])[0])
    (out / "dataset.json").write_text(json.dumps({**data.index, "clips": entries, "audio": []}, indent=1))
    topology = importlib.util.find_spec("mediapipe.python.solutions.face_mesh_connections").origin
    shim = out / "site" / "mediapipe" / "python" / "solutions"
    shim.mkdir(parents=True)
    for package in (shim.parents[1], shim.parent, shim):
        (package / "__init__.py").touch()
    shutil.copy(topology, shim)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"packed {len(entries)} clips ({frames} frames) and {len(data.portraits())} portraits: {size / 1e6:.1f} MB")


# Unpack and train (on the GPU machine) --------------------------------------------------------------


def _unpack_one(job):
    packed, out, clip_id, size = job
    source, folder = packed / "clips" / clip_id, out / "clips" / clip_id
    (folder / "frames").mkdir(parents=True, exist_ok=True)
    pack_file = np.load(source / "pack.npz")
    landmarks = unpack_meshes(pack_file)
    np.save(folder / "landmarks.npy", landmarks)
    np.save(folder / "matrices.npy", pack_file["matrices"])
    np.save(folder / "indices.npy", pack_file["indices"])
    np.save(folder / "person.npy", _decompress(pack_file["person"], np.uint8, (len(landmarks), MASK_SIZE, MASK_SIZE)))
    video, count = cv2.VideoCapture(str(source / "frames.mp4")), 0
    while True:
        ok, frame = video.read()
        if not ok:
            break
        frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(folder / "frames" / f"{count:05d}.jpg"), frame, [cv2.IMWRITE_JPEG_QUALITY, 95])
        count += 1
    if count != len(landmarks):
        raise RuntimeError(f"{source / 'frames.mp4'}: {count} frames decoded, {len(landmarks)} meshes.")
    shutil.copy(source / "meta.json", folder / "meta.json")
    return count


def unpack(args) -> None:
    packed, out = Path(args.packed), Path(args.out)
    index = json.loads((packed / "dataset.json").read_text())
    jobs = [(packed, out, entry["id"], index["size"]) for entry in index["clips"]]
    with ProcessPoolExecutor(args.workers) as pool:
        frames = sum(pool.map(_unpack_one, jobs))
    shutil.copytree(packed / "portraits", out / "portraits", dirs_exist_ok=True)
    shutil.copy(packed / "dataset.json", out / "dataset.json")
    print(f"unpacked {len(jobs)} clips ({frames} frames) into {out}")


class WithPersonMask(np.ndarray):
    """An RGB frame that carries its stored person mask (uint8, 64²) through the training script's data code."""

    person = None


def _with_mask(image: np.ndarray, mask: np.ndarray) -> WithPersonMask:
    tagged = image.view(WithPersonMask)
    tagged.person = mask
    return tagged


class StoredPersonMasks:
    """Stands in for FaceProcessor in the training script's validation batch, which asks it only for the person masks
    of frames read from the dataset: their stored masks."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self) -> None:
        pass

    def person_mask(self, image: np.ndarray) -> np.ndarray:
        mask = getattr(image, "person", None)
        if mask is None:
            raise ValueError("This frame carries no stored person mask: read it from a dataset `unpack` wrote.")
        size = image.shape[1], image.shape[0]
        return cv2.resize(np.asarray(mask, np.float32) / 255, size, interpolation=cv2.INTER_LINEAR)


def use_stored_person_masks(train) -> None:
    """Patch the training module `train` (and the prepared-data reader) to take person masks from the dataset."""
    read_frame, read_portrait = prepared.PreparedClip.frame, prepared.PreparedPortrait.image

    def clip_frame(clip, i):
        masks = np.load(clip.folder / "person.npy", mmap_mode="r")  # one frame's mask read, not the clip's
        return _with_mask(read_frame(clip, i), masks[i % clip.num_frames])

    def portrait_image(portrait):
        return _with_mask(read_portrait(portrait), np.load(portrait.root / "portraits" / f"{portrait.id}.person.npy"))

    def stored_person_mask(self, source, framing, augmented):
        mask = StoredPersonMasks().person_mask(source)
        return cv2.warpAffine(mask, framing, (self.size,) * 2, borderMode=cv2.BORDER_REPLICATE)

    prepared.PreparedClip.frame = clip_frame
    prepared.PreparedPortrait.image = portrait_image
    train.FaceProcessor = StoredPersonMasks
    train.HeadImitationDataset.person_mask = stored_person_mask
    train.export_pipeline = export_renderer


def export_renderer(renderer, folder, dtype=None) -> None:
    """The renderer's four components in fp16, each in its Hub-layout subfolder."""
    import torch

    shutil.rmtree(folder, ignore_errors=True)
    for name in train_head_imitation.RENDERER:
        component = copy.deepcopy(getattr(renderer, name))
        torch.nn.Module.to(component, dtype=dtype or torch.float16)
        component.save_pretrained(Path(folder) / name, safe_serialization=True)


def train(args) -> None:
    import torch

    use_stored_person_masks(train_head_imitation)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.time_budget:
        parse_args = train_head_imitation.parse_args

        def parse_args_with_budget(argv=None):
            training_args = parse_args(argv)

            def stop():
                time.sleep(args.time_budget)
                print(f"Time budget of {args.time_budget:.0f} s spent: stopping.", flush=True)
                training_args.max_train_steps = 0  # the loop ends after its current step

            threading.Thread(target=stop, daemon=True).start()
            return training_args

        train_head_imitation.parse_args = parse_args_with_budget
    train_head_imitation.main(args.training_args)


# Bring candidates back (there), and make pipelines of them (here) ------------------------------------------


def states(args) -> None:
    """Each `checkpoint-N` of a run as one small file `<out>/checkpoint-N.safetensors`: the named components'
    weights in fp16 under `<component>.<parameter>`, with their configs (from the run's last export,
    `<output_dir>/pipeline`) in the metadata. A short lease brings back every state the in-training validation
    scored, not only the last, in a few MB each (frozen components left out)."""
    import torch
    from safetensors.torch import load_file, save_file

    run, out = Path(args.output_dir), Path(args.out)
    checkpoints = train_head_imitation.checkpoints(run)
    if not checkpoints:
        raise FileNotFoundError(f"{run} holds no checkpoint-N folder: give the training run's --output_dir.")
    metadata = {}
    for name in args.components:
        config = run / "pipeline" / name / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{config} is missing: the run exports its components there at every checkpoint.")
        metadata[name] = config.read_text()
    out.mkdir(parents=True, exist_ok=True)
    for checkpoint in checkpoints:
        weights = load_file(checkpoint / "model.safetensors")
        kept = {k: v.to(torch.float16) for k, v in weights.items() if k.split(".", 1)[0] in metadata}
        target = out / f"{checkpoint.name}.safetensors"
        save_file(kept, target, metadata=metadata)
        print(f"{target}: {len(kept)} tensors of {', '.join(metadata)}")


def bundle(args) -> None:
    """A pipeline folder: `--base` with the components of a `states` file swapped in (fp16, their configs)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pipeline_infp.presets import component_class

    base, out = Path(args.base), Path(args.out)
    if out.exists():
        raise FileExistsError(f"{out} exists: choose a new folder.")
    with safe_open(args.state, "pt") as handle:
        configs = {name: json.loads(text) for name, text in (handle.metadata() or {}).items() if name != "format"}
    if not configs:
        raise ValueError(f"{args.state} names no component in its metadata: write it with `remote_gpu.py states`.")
    weights = load_file(args.state)
    components = {}
    for name, config in configs.items():  # all loaded before anything is written: no half-made folder on an error
        config.pop("_name_or_path", None)  # where the run loaded it from, a path of the GPU machine
        components[name] = component_class(name).from_config(config)
        prefix = f"{name}."
        components[name].load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    shutil.copytree(base, out)
    for name, component in components.items():
        shutil.rmtree(out / name, ignore_errors=True)
        torch.nn.Module.to(component, dtype=torch.float16).save_pretrained(out / name, safe_serialization=True)
    print(f"{out}: {base} with {', '.join(configs)} from {args.state}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="here: a small copy of a prepared dataset")
    packing.add_argument("--data_dir", required=True, help="a dataset written by training/prepare_data.py")
    packing.add_argument("--out", required=True)
    packing.add_argument("--every", type=int, default=3, help="keep every N-th frame of the training clips")
    packing.add_argument("--val_frames", type=int, default=40, help="frames kept of each val clip (every N-th)")
    packing.add_argument("--frame_size", type=int, default=128, help="the renderer's working size")
    packing.add_argument("--kinds", nargs="+", default=list(train_head_imitation.KINDS))
    packing.add_argument("--workers", type=int, default=2)
    packing.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    unpacking = commands.add_parser("unpack", help="there: the packed copy as a prepared dataset")
    unpacking.add_argument("--packed", required=True)
    unpacking.add_argument("--out", required=True)
    unpacking.add_argument("--workers", type=int, default=16)
    training = commands.add_parser("train", help="there: train_head_imitation.py on the unpacked dataset")
    training.add_argument("--time_budget", type=float, default=0, help="seconds; 0: train all steps")
    training.add_argument("training_args", nargs=argparse.REMAINDER, help="-- then train_head_imitation.py's")
    saving = commands.add_parser("states", help="there: every checkpoint of a run as a small fp16 file")
    saving.add_argument("--output_dir", required=True, help="the training run's --output_dir")
    saving.add_argument("--out", required=True)
    saving.add_argument("--components", nargs="+", default=list(train_head_imitation.RENDERER),
                        choices=train_head_imitation.RENDERER, help="those trained (default: all four)")  # fmt: skip
    bundling = commands.add_parser("bundle", help="here: a pipeline folder with a states file's components")
    bundling.add_argument("--state", required=True, help="a file `states` wrote")
    bundling.add_argument("--base", required=True, help="the pipeline folder to copy, e.g. checkpoints/infp-base")
    bundling.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "train" and args.training_args[:1] == ["--"]:
        args.training_args = args.training_args[1:]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    {"pack": pack, "unpack": unpack, "train": train, "states": states, "bundle": bundle}[args.command](args)


if __name__ == "__mp_main__" and sys.argv[1:2] == ["train"]:  # a data loader worker `train` spawned: same patches
    use_stored_person_masks(train_head_imitation)

if __name__ == "__main__":
    main()
