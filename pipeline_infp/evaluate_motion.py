"""`python -m pipeline_infp.evaluate motion`: the whole pipeline judged on the videos it renders.

Items: every `talking` clip of the val split (own track = its speech, no partner, portrait = its first frame,
ground truth = the clip itself, cut with the first frame's crop) and every `dual-audio` pair, each side in
turn as the agent's own voice with the other as the partner's (portraits from the manifest in turn; no
ground truth; with --every-portrait, a side for every portrait, the sides in turn). Each item is rendered by
the methods
  generated  — the pipeline (its defaults unless --steps / --guidance-scale),
  static     — the portrait unchanged,
  random     — the motion of a random training clip (`talking`, split train),
  retrieval  — for each second of the own track, the motion of the training second with the nearest audio
               (MFCC mean and spread),
and MediaPipe reads every output frame. Per frame: motion features (`MotionFeatureSpace`: head pose and a
pose-free expression PCA, fitted on the training clips and saved as `<checkpoint>/motion_features.npz`),
mouth and eye apertures. Reported (DIM/ELP definitions where they exist): FD and paired FD (motion ‖ own-track
MFCC) against the ground-truth frames, SID (k-means entropy, k = 40 on expression, 20 on pose, fitted on the
ground truth), temporal variance, rPCC (|PCC(motion energy, speech energy) − the same for the ground truth|),
MSE against the ground truth, mouth-aperture correlation with the ground truth on speech (at lag 0, and the best
over lags up to --sync-search frames for footage whose sound is off), the closed-mouth
fraction where only the partner speaks (closed in absolute terms, and opened no further than the portrait's own
mouth), speaking/listening state accuracy against voice activity, blinks per
minute, and the motion change at window boundaries relative to inside windows. `--sweep` adds a table over
DDIM steps × guidance scale for choosing the defaults; `--styles` measures how each style preset moves the
rendered expression (mouth corners, brows, mouth and eye opening) against the neutral preset.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline_infp.evaluate import (
    _machine,
    _round,
    iter_crops,
    pearson,
    read_manifest,
    spread,
    track_clip,
    write_json,
)
from pipeline_infp.generate import add_silent_mouth_argument
from pipeline_infp.motion_features import POSE_DIM, MotionFeatureSpace
from pipeline_infp.motion_metrics import (
    blinks_per_minute,
    closed_mouth_fraction,
    frechet_distance,
    paired_frechet_distance,
    sid,
    speaking_state,
    temporal_variance,
)
from pipeline_infp.pipeline_infp import DEFAULT_GUIDANCE_SCALE, INFPPipeline
from pipeline_infp.processing import (
    SAMPLE_RATE,
    FaceCrop,
    FaceProcessor,
    INFPInputError,
    NoFaceDetectedError,
    eye_aperture,
    load_audio,
    mouth_aperture,
    voice_activity,
)
from pipeline_infp.processing.video import read_audio_track

logger = logging.getLogger(__name__)
METHODS = ("generated", "static", "random", "retrieval")
CHUNK = 25  # frames per retrieval unit (1 s)
IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


def speech_features(audio: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    """13 MFCCs per video frame [num_frames, 13] (the own track's content, for paired FD and retrieval)."""
    import librosa

    hop = round(SAMPLE_RATE / fps)
    mfcc = librosa.feature.mfcc(y=np.asarray(audio, np.float32), sr=SAMPLE_RATE, n_mfcc=13, hop_length=hop, n_fft=1024)
    mfcc = mfcc.T[:num_frames]
    return np.pad(mfcc, ((0, num_frames - len(mfcc)), (0, 0)), mode="edge")


def speech_energy(audio: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
    hop = round(SAMPLE_RATE / fps)
    padded = np.pad(np.asarray(audio, np.float64), (0, max(0, num_frames * hop - len(audio))))
    return np.sqrt((padded[: num_frames * hop].reshape(num_frames, hop) ** 2).mean(1))


class Reader:
    """MediaPipe on rendered frames → landmarks (last good frame where no face is found) and the found mask."""

    def __init__(self, processor: FaceProcessor):
        self.processor = processor

    def __call__(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        landmarks, found, last = [], np.zeros(len(frames), bool), None
        for t, frame in enumerate(frames):
            try:
                last = self.processor.landmarks(frame)
                found[t] = True
            except NoFaceDetectedError:
                pass
            landmarks.append(last)
        first = next((lm for lm in landmarks if lm is not None), None)
        if first is None:
            raise NoFaceDetectedError("MediaPipe found no face in any rendered frame.")
        return np.stack([first if lm is None else lm for lm in landmarks]), found


def track_items(entries, processor, args, split: str, count: int | None = None) -> list[dict]:
    """Talking clips of a split (`count` of them spread over the list, or all) with their fixed-crop frames,
    landmarks and own audio, capped at --max-seconds."""

    frames_cap = round(args.max_seconds * args.fps)
    items = []
    chosen = [e for e in entries if e.kind == "talking" and (e.split or "val") == split]
    for entry in spread(chosen, count):
        try:
            track = track_clip(processor, entry.path, args.size, args.fps, frames_cap).fixed()
            audio = read_audio_track(entry.path)
        except (INFPInputError, OSError) as error:
            logger.warning("Skipping %s: %s", entry.id, error)
            continue
        if audio is None or len(track.indices) < CHUNK:
            continue
        crops = np.concatenate([c for _, c in iter_crops(entry.path, track, args.fps)])
        span = int(track.indices[-1]) + 1
        audio = np.pad(audio, (0, max(0, span * SAMPLE_RATE // round(args.fps) - len(audio))))
        audio = audio[: round(span / args.fps * SAMPLE_RATE)]
        items.append({"id": entry.id, "crops": crops, "landmarks": track.landmarks, "indices": track.indices,
                      "audio": audio})  # fmt: skip
    return items


def motion_bank(pipe, items: list[dict], fps: float) -> list[dict]:
    """Training clips as (motion latents relative to their first frame, per-second MFCC summaries)."""
    bank = []
    for item in items:
        latents = torch.cat(
            [
                pipe.encode_motion(item["crops"][i : i + 32], item["landmarks"][i : i + 32], item["landmarks"][0])
                for i in range(0, len(item["crops"]), 32)
            ]
        ).float()
        mfcc = speech_features(item["audio"], int(item["indices"][-1]) + 1, fps)[item["indices"]]
        chunks = len(latents) // CHUNK
        summaries = np.stack([np.concatenate([m.mean(0), m.std(0)]) for m in np.split(mfcc[: chunks * CHUNK], chunks)])
        bank.append({"id": item["id"], "latents": latents, "summaries": summaries})
    return bank


def retrieve(bank: list[dict], audio: np.ndarray, num_frames: int, fps: float) -> torch.Tensor:
    """Latents [num_frames, D]: each second takes the training second whose MFCC summary is nearest."""
    keys = np.concatenate([b["summaries"] for b in bank])
    owners = [(k, c) for k, b in enumerate(bank) for c in range(len(b["summaries"]))]
    mean, std = keys.mean(0), keys.std(0) + 1e-6
    mfcc = speech_features(audio, num_frames, fps)
    out = []
    for start in range(0, num_frames, CHUNK):
        part = mfcc[start : start + CHUNK]
        query = (np.concatenate([part.mean(0), part.std(0)]) - mean) / std
        k, c = owners[int(np.argmin((((keys - mean) / std - query) ** 2).sum(1)))]
        out.append(bank[k]["latents"][c * CHUNK : c * CHUNK + len(part)])
    return torch.cat(out)


def random_motion(bank: list[dict], num_frames: int, rng) -> torch.Tensor:
    clip = bank[rng.integers(len(bank))]["latents"]
    start = rng.integers(len(clip))
    return clip[(start + np.arange(num_frames)) % len(clip)]


def boundary_ratio(latents: torch.Tensor, window: int, overlap: int = 0) -> float:
    """Mean |Δ latent| where windows join over the mean elsewhere (1: no visible seam). Windows start every
    `window - overlap` frames; a join is every step from the last frame before the shared ones to the new
    window's first frame of its own (without overlap: the one step from one window to the next)."""
    steps = (latents[1:] - latents[:-1]).norm(dim=1).cpu().numpy()
    stride = window - overlap
    num_windows = 1 + -(-max(0, len(latents) - window) // stride)
    at = np.zeros(len(steps), bool)
    for start in range(stride, num_windows * stride, stride):
        at[start - 1 : start + overlap] = True
    if not at.any() or at.all():
        return float("nan")
    return float(steps[at].mean() / max(steps[~at].mean(), 1e-12))


def load_motion_pipeline(args: argparse.Namespace) -> INFPPipeline:
    """--checkpoint on --device, quiet; a stage-1 folder (no motion model) is refused."""
    pipe = INFPPipeline.from_pretrained(args.checkpoint).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if pipe.motion_transformer is None:
        raise ValueError(f"{args.checkpoint} has no motion model (a stage-1 checkpoint): train stage 2 first.")
    return pipe


def run_motion(args: argparse.Namespace) -> dict:
    start_time = time.perf_counter()
    entries = read_manifest(args.manifest)
    pipe = load_motion_pipeline(args)
    fps, window = pipe.fps, pipe.motion_transformer.config.window_size
    rng = np.random.default_rng(args.seed)
    with FaceProcessor() as processor:
        read = Reader(processor)
        logger.info("Tracking the training clips (feature space and baselines' motion bank)")
        train = track_items(entries, processor, args, "train", args.bank_clips)
        features_path = Path(args.features or Path(args.checkpoint) / "motion_features.npz")
        if features_path.is_file():
            space = MotionFeatureSpace.load(features_path)
        else:
            space = MotionFeatureSpace.fit([t["landmarks"] for t in train])
            space.save(features_path)
        bank = motion_bank(pipe, train, fps)
        val = track_items(entries, processor, args, "val")
        items = [dict(item, kind="talking") for item in val] + conversation_items(entries, processor, args)

        results = {m: [] for m in ("ground truth", *METHODS)}
        for item in tqdm(items, desc="items", unit="item", disable=not args.progress):
            results_for_item = evaluate_item(pipe, item, bank, read, space, args, rng, window)
            for method, value in results_for_item.items():
                results[method].append(value)
        summary, lip_sync = summarise(results, space, args)
        talking_items = [i for i in items if i["kind"] == "talking"]
        styles = run_styles(pipe, talking_items[: args.sweep_items], read, args) if args.styles else None
        sweep = None
        if args.sweep:
            sides = [i for i in items if i["kind"] == "dual"][: args.sweep_items]
            sweep = run_sweep(pipe, talking_items[: args.sweep_items], sides, read, space, args)

    note = (
        f"{sum(i['kind'] == 'talking' for i in items)} val talking clips and "
        f"{sum(i['kind'] == 'dual' for i in items)} dual-audio sides, at most {args.max_seconds:g} s each; "
        f"generated with {args.steps} DDIM steps, guidance {args.guidance_scale}. Wall time "
        f"{time.perf_counter() - start_time:.0f} s."
    )
    table = format_motion_table(summary) + "\n" + note
    print(table)
    if sweep:
        print(format_sweep(sweep))
    if styles:
        print(format_styles(styles))
    out = {
        "command": "motion",
        "manifest": str(Path(args.manifest).resolve()),
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "features": str(features_path.resolve()),
        "settings": {k: v for k, v in vars(args).items() if k not in ("handler",)},
        "machine": _machine(args.device),
        "summary": summary,
        "sweep": sweep,
        "styles": styles,
        "table": table,
        "items": [{k: v for k, v in i.items() if k in ("id", "kind")} for i in items],
        "mouth_corr_per_clip": {i["id"]: c for i, (c, _) in zip(talking_items, lip_sync["generated"]["lag 0"])},
        "mouth_corr_lag_searched_per_clip": {
            i["id"]: {"corr": c, "lag": lag} for i, (c, lag) in zip(talking_items, lip_sync["generated"]["searched"])
        },
        "listening_per_side": {
            i["id"]: listening_fractions(r)
            for i, r in zip(
                [i for i in items if i["kind"] == "dual"], [r for r in results["generated"] if r["kind"] == "dual"]
            )
        },
    }
    out = _round(out)
    if args.json:
        write_json(args.json, out)
    return out


# --------------------------------------------------------------------------------------------- per item


def _record(landmarks, found, space, audio_series: dict) -> dict:
    """Per-frame series of one method's output; `audio_series` (the item's voice activity and own-track
    features, computed once per item) is shared by every method's record."""
    return {
        "features": space.transform(landmarks),
        "mouth": mouth_aperture(landmarks),
        "eye": eye_aperture(landmarks),
        "found": found,
        **audio_series,
    }


def _uint8(frames) -> np.ndarray:
    return (np.asarray(frames) * 255).round().clip(0, 255).astype(np.uint8)


def conversation_items(entries, processor, args) -> list[dict]:
    """Every `dual-audio` pair, each side in turn as the own voice with the other as the partner's, capped at
    --max-seconds; portraits of the manifest in turn (a pair is left out when the manifest has none). With
    --every-portrait, as many items as portraits when they outnumber the sides (the sides in turn), so that every
    portrait listens: whether a closed mouth holds depends on the face as much as on the motion."""
    portraits = [e for e in entries if e.kind == "portrait"]
    conversations: dict[str, list] = {}
    for entry in entries:
        if entry.kind == "dual-audio":
            conversations.setdefault(entry.identity, []).append(entry)
    limit = round(args.max_seconds * SAMPLE_RATE)
    pairs = [sorted(p, key=lambda e: e.id) for p in conversations.values() if len(p) == 2]
    sides = [side for a, b in pairs for side in ((a, b), (b, a))]
    if not sides or not portraits:
        return []
    tracks = {}  # each side's (own, partner) audio, loaded once however many portraits it is given
    for own, other in sides:
        own_audio, partner_audio = load_audio(own.path)[:limit], load_audio(other.path)[:limit]
        length = max(len(own_audio), len(partner_audio))
        tracks[own.id] = (np.pad(own_audio, (0, length - len(own_audio))),
                          np.pad(partner_audio, (0, length - len(partner_audio))))  # fmt: skip
    count = max(len(sides), len(portraits)) if args.every_portrait else len(sides)
    items = []
    for n in range(count):
        (own, other), portrait = sides[n % len(sides)], portraits[n % len(portraits)]
        try:
            crop = processor.crop_portrait(portrait.path, size=args.size)
        except INFPInputError as error:
            logger.warning("Skipping portrait %s: %s", portrait.id, error)
            continue
        own_audio, partner_audio = tracks[own.id]
        items.append({"id": f"{own.id} (partner {other.id}, portrait {portrait.id})", "kind": "dual",
                      "portrait": crop, "audio": own_audio, "partner": partner_audio})  # fmt: skip
    return items


def first_frame_face(item: dict) -> FaceCrop:
    """A talking clip's first crop as the portrait (its crop frame is the one every frame was cut with)."""
    return FaceCrop(item["crops"][0], item["landmarks"][0], IDENTITY, item["crops"][0])


def generate(pipe, face, own, partner, steps: int, guidance: float, args, style=None):
    generator = torch.Generator().manual_seed(args.seed)
    out = pipe(face, own, partner, style=style, num_inference_steps=steps, guidance_scale=guidance,
               generator=generator, window_overlap=args.window_overlap, close_mouth=args.close_mouth,
               silent_mouth_rest=args.silent_mouth_rest, output_type="np")  # fmt: skip
    return _uint8(out.frames), out.motion_latents


def evaluate_item(pipe, item, bank, read, space, args, rng, window) -> dict:
    """Records per method (and the ground truth, for talking clips) of one item."""
    fps = pipe.fps
    if item["kind"] == "talking":
        face = first_frame_face(item)
        own, partner = item["audio"], np.zeros_like(item["audio"])
    else:
        face, own, partner = item["portrait"], item["audio"], item["partner"]
    frames, latents = generate(pipe, face, own, partner, args.steps, args.guidance_scale, args)
    num_frames = len(frames)
    audio_series = {
        "own_vad": voice_activity(own, num_frames, fps=fps),
        "partner_vad": voice_activity(partner, num_frames, fps=fps),
        "speech": speech_features(own, num_frames, fps),
        "energy": speech_energy(own, num_frames, fps),
    }
    records = {"generated": _record(*read(frames), space, audio_series)}
    overlap = pipe.resolve_window_overlap(args.window_overlap)
    records["generated"]["boundary"] = boundary_ratio(latents, window, overlap)

    portrait_landmarks, found = read(face.image[None])
    records["static"] = _record(
        np.repeat(portrait_landmarks, num_frames, 0), np.repeat(found, num_frames), space, audio_series
    )
    encoding = pipe.encode_portrait(face, close_mouth=args.close_mouth)
    for method, motion in (
        ("random", random_motion(bank, num_frames, rng)),
        ("retrieval", retrieve(bank, own, num_frames, fps)),
    ):
        rendered = _uint8(pipe.render(encoding, motion.to(pipe.device)).permute(0, 2, 3, 1).cpu().float().numpy())
        records[method] = _record(*read(rendered), space, audio_series)
    if item["kind"] == "talking":
        # Ground truth on the timeline of its kept frames; every method is compared at those frames.
        keep = item["indices"][item["indices"] < num_frames]
        kept_series = {k: v[keep] for k, v in audio_series.items()}
        records["ground truth"] = _record(item["landmarks"][: len(keep)], np.ones(len(keep), bool), space, kept_series)
        for method in METHODS:
            per_frame = ("features", "mouth", "eye", "found", *audio_series)
            records[method]["aligned"] = {k: records[method][k][keep] for k in per_frame}
    rest_mouth = float(mouth_aperture(portrait_landmarks[0]))
    for record in records.values():
        record["kind"], record["rest_mouth"] = item["kind"], rest_mouth
    return records


# --------------------------------------------------------------------------------------------- summary


def _energy(features: np.ndarray) -> np.ndarray:
    return np.r_[0.0, np.linalg.norm(np.diff(features, axis=0), axis=1)]


def compared_talking(method: str, results: dict) -> list[dict]:
    """A method's talking-clip records on the ground truth's frames (the frames where the real clip has a face)."""
    talking = [r for r in results[method] if r["kind"] == "talking"]
    return talking if method == "ground truth" else [dict(r, **r["aligned"]) for r in talking]


def mouth_correlations(records: list[dict], truth: list[dict], max_lag: int = 0) -> list[tuple[float, int]]:
    """Per talking clip: the mouth opening's correlation with the real one on the frames of its own speech, and
    the lag (real frame − generated frame) where it was taken. With `max_lag` the best over lags up to that many
    frames either way, as SyncNet's offset search does: some real clips' sound and picture are a few frames apart
    (training/av_sync.py measures them), and a lag-0 figure blames the method for the footage."""
    correlations = []
    for r, t in zip(records, truth):
        speech, n, candidates = t["own_vad"] > 0.5, len(r["mouth"]), []
        for lag in range(-max_lag, max_lag + 1):
            generated, real = slice(max(0, -lag), n - max(0, lag)), slice(max(0, lag), n + min(0, lag))
            keep = speech[generated]  # the frames where the audio that drove the generated frame is speech
            candidates.append((pearson(r["mouth"][generated][keep], t["mouth"][real][keep]), lag))
        correlations.append(max(candidates, key=lambda c: (c[0], -abs(c[1]))))
    return correlations


LISTENING_KEYS = ("closed_mouth_listening", "rest_mouth_listening")


def listening_fractions(record: dict) -> dict:
    """Where only the partner speaks, the fraction of frames with a closed mouth (an inner-lip gap under 0.05
    inter-ocular distances) and with the mouth at rest (opened by less than that beyond the portrait's own mouth: a
    portrait smiling with parted lips is not talking when it keeps that mouth); None without such frames."""
    listening = (record["own_vad"] < 0.5) & (record["partner_vad"] > 0.5)
    if not listening.any():
        return {"closed_mouth_listening": None, "rest_mouth_listening": None}
    return {
        "closed_mouth_listening": closed_mouth_fraction(record["mouth"], listening),
        "rest_mouth_listening": closed_mouth_fraction(record["mouth"] - record["rest_mouth"], listening),
    }


def side_listening(mouth: np.ndarray, rest_mouth: float, own: np.ndarray, partner: np.ndarray, fps: float) -> dict:
    """`listening_fractions` of one conversation side's generated mouth [T], from its two tracks."""
    return listening_fractions({
        "mouth": mouth, "rest_mouth": rest_mouth, "own_vad": voice_activity(own, len(mouth), fps=fps),
        "partner_vad": voice_activity(partner, len(mouth), fps=fps),
    })  # fmt: skip


def mean_over_items(rows: list[dict], keys) -> dict:
    """Per key, the mean over the rows that have a value (absent, None or NaN: a side where the partner never
    speaks alone has no listening figure); None when no row has one."""
    means = {}
    for key in keys:
        values = [r[key] for r in rows if r.get(key) is not None and not np.isnan(r[key])]
        means[key] = float(np.mean(values)) if values else None
    return means


def summarise(results: dict, space: MotionFeatureSpace, args) -> tuple[dict, dict]:
    """The table's row per method, and per method the per-clip lip sync behind its two mouth columns
    (`{"lag 0": [(corr, 0)], "searched": [(corr, lag)]}`, in talking-clip order)."""
    from sklearn.cluster import KMeans

    truth = results["ground truth"]
    if not truth:
        raise ValueError("No val talking clip could be evaluated: the metrics need ground truth.")
    truth_frames = np.concatenate([r["features"] for r in truth])
    truth_pose, truth_expression = truth_frames[:, :POSE_DIM], truth_frames[:, POSE_DIM:]
    expression = KMeans(n_clusters=min(40, len(truth_frames)), n_init=3, random_state=0).fit(truth_expression)
    pose = KMeans(n_clusters=min(20, len(truth_frames)), n_init=3, random_state=0).fit(truth_pose)
    fps = args.fps
    summary, lip_sync = {}, {}
    for method, records in results.items():
        dual = [r for r in records if r["kind"] == "dual"]
        compared = compared_talking(method, results)
        lip_sync[method] = {
            "lag 0": mouth_correlations(compared, truth),
            "searched": mouth_correlations(compared, truth, args.sync_search),
        }
        frames = np.concatenate([r["features"] for r in compared])
        row = {
            "fd": frechet_distance(frames, truth_frames),
            "paired_fd": paired_frechet_distance(
                frames,
                np.concatenate([t["speech"] for t in truth]),
                truth_frames,
                np.concatenate([t["speech"] for t in truth]),
            ),  # fmt: skip
            "sid_expression": sid([r["features"][:, POSE_DIM:] for r in compared], expression.cluster_centers_),
            "sid_pose": sid([r["features"][:, :POSE_DIM] for r in compared], pose.cluster_centers_),
            "variance": temporal_variance([r["features"] for r in compared]),
            "rpcc": float(
                np.mean(
                    [
                        abs(
                            pearson(_energy(r["features"]), t["energy"]) - pearson(_energy(t["features"]), t["energy"])
                        )
                        for r, t in zip(compared, truth)
                    ]
                )
            ),  # fmt: skip
            "mse": float(np.mean([np.mean((r["features"] - t["features"]) ** 2) for r, t in zip(compared, truth)])),
            "mouth_corr": float(np.mean([c for c, _ in lip_sync[method]["lag 0"]])),
            "mouth_corr_lag_searched": float(np.mean([c for c, _ in lip_sync[method]["searched"]])),
            "blinks_per_min": float(np.mean([blinks_per_minute(r["eye"], fps) for r in compared])),
        }
        row |= mean_over_items([listening_fractions(r) for r in dual], LISTENING_KEYS)
        every = compared + dual
        row["state_accuracy"] = float(np.mean(np.concatenate([
            speaking_state(r["mouth"], fps) == (r["own_vad"] > 0.5) for r in every
        ])))  # fmt: skip
        row["face_found"] = float(np.mean(np.concatenate([r["found"] for r in every])))
        if method == "generated":
            row["boundary_ratio"] = float(np.nanmean([r["boundary"] for r in records]))
        summary[method] = row
    return summary, lip_sync


def run_sweep(pipe, items, sides, read, space, args) -> list[dict]:
    """Over DDIM steps × guidance: FD, mouth correlation on speech and state accuracy of the generated motion on
    the talking `items`, and where only the partner speaks in the conversation `sides`, the closed and rest mouth
    fractions (`listening_fractions`; with `--silent-mouth-rest 0`, what more guidance costs while listening)."""
    truth = [space.transform(item["landmarks"]) for item in items]
    rests = [float(mouth_aperture(read(side["portrait"].image[None])[0][0])) for side in sides]
    rows = []
    for steps, guidance in itertools.product(args.sweep_steps, args.sweep_guidance):
        features, mouth_corr, accuracy = [], [], []
        for item in items:
            face = first_frame_face(item)
            frames, _ = generate(pipe, face, item["audio"], None, steps, guidance, args)
            landmarks, _ = read(frames)
            keep = item["indices"][item["indices"] < len(frames)]
            vad = voice_activity(item["audio"], len(frames), fps=pipe.fps)
            mouth, truth_mouth = mouth_aperture(landmarks), mouth_aperture(item["landmarks"][: len(keep)])
            features.append(space.transform(landmarks)[keep])
            [(correlation, _)] = mouth_correlations(
                [{"mouth": mouth[keep]}], [{"mouth": truth_mouth, "own_vad": vad[keep]}]
            )
            mouth_corr.append(correlation)
            accuracy.append(np.mean(speaking_state(mouth, pipe.fps) == (vad > 0.5)))
        listening = []
        for side, rest in zip(sides, rests):
            frames, _ = generate(pipe, side["portrait"], side["audio"], side["partner"], steps, guidance, args)
            listening.append(
                side_listening(mouth_aperture(read(frames)[0]), rest, side["audio"], side["partner"], pipe.fps)
            )
        fd = frechet_distance(np.concatenate(features), np.concatenate(truth))
        row = {"steps": steps, "guidance_scale": guidance, "fd": fd, "mouth_corr": float(np.mean(mouth_corr)),
               "state_accuracy": float(np.mean(accuracy))}  # fmt: skip
        rows.append(row | mean_over_items(listening, LISTENING_KEYS))
    return rows


# Expression measures in inter-ocular units, image y pointing down: mouth corners (61, 291) above the inner-lip
# centre (13, 14) when smiling; brows (105, 334) above the upper eyelids (159, 386) when surprised.
def expression_measures(landmarks: np.ndarray) -> dict[str, float]:
    points = np.asarray(landmarks, dtype=np.float64)[..., :2]
    iod = np.linalg.norm(points[:, 33] - points[:, 263], axis=-1)
    centre_y = (points[:, 13, 1] + points[:, 14, 1]) / 2
    corners_y = (points[:, 61, 1] + points[:, 291, 1]) / 2
    lids_y, brows_y = (points[:, 159, 1] + points[:, 386, 1]) / 2, (points[:, 105, 1] + points[:, 334, 1]) / 2
    return {
        "corner_lift": float(np.nanmean((centre_y - corners_y) / iod)),
        "brow_raise": float(np.nanmean((lids_y - brows_y) / iod)),
        "mouth_open": float(np.nanmean(mouth_aperture(landmarks))),
        "eye_open": float(np.nanmean(eye_aperture(landmarks))),
    }


def run_styles(pipe, items, read, args) -> dict:
    """Each style preset's change of the rendered expression against the neutral preset (mean over the items)."""
    names = pipe.motion_guider.style_preset_names
    if "neutral" not in names:
        return {}
    measures = {name: [] for name in names}
    for item in items:
        face = first_frame_face(item)
        for name in names:
            frames, _ = generate(pipe, face, item["audio"], None, args.steps, args.guidance_scale, args, name)
            landmarks, found = read(frames)
            measures[name].append(expression_measures(landmarks[found]))
    mean = {name: {k: float(np.mean([m[k] for m in rows])) for k in rows[0]} for name, rows in measures.items()}
    return {name: {k: v - mean["neutral"][k] for k, v in row.items()} for name, row in mean.items()}


def format_styles(effects: dict) -> str:
    keys = ["corner_lift", "brow_raise", "mouth_open", "eye_open"]
    body = [[name] + [f"{row[k]:+.4f}" for k in keys] for name, row in effects.items()]
    return _table(["style − neutral", "mouth corners up", "brows up", "mouth open", "eyes open"], body)


COLUMNS = [
    ("FD ↓", "fd", "{:.2f}"), ("P-FD ↓", "paired_fd", "{:.2f}"), ("SID exp", "sid_expression", "{:.2f}"),
    ("SID pose", "sid_pose", "{:.2f}"), ("Var", "variance", "{:.3f}"), ("rPCC ↓", "rpcc", "{:.3f}"),
    ("MSE ↓", "mse", "{:.3f}"), ("mouth corr ↑", "mouth_corr", "{:+.3f}"),
    ("mouth corr, lag searched ↑", "mouth_corr_lag_searched", "{:+.3f}"),
    ("closed mouth listening ↑", "closed_mouth_listening", "{:.1%}"),
    ("rest mouth listening ↑", "rest_mouth_listening", "{:.1%}"), ("state acc ↑", "state_accuracy", "{:.1%}"),
    ("blinks/min", "blinks_per_min", "{:.1f}"), ("boundary/inside", "boundary_ratio", "{:.2f}"),
]  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def format_motion_table(summary: dict) -> str:
    rows = [
        [method] + [("—" if row.get(key) is None else fmt.format(row[key])) for _, key, fmt in COLUMNS]
        for method, row in summary.items()
    ]
    return _table(["method"] + [c[0] for c in COLUMNS], rows)


def format_sweep(rows: list[dict]) -> str:
    def percent(value):
        return "—" if value is None else f"{value:.1%}"

    body = [[str(r["steps"]), f"{r['guidance_scale']:g}", f"{r['fd']:.2f}", f"{r['mouth_corr']:+.3f}",
             f"{r['state_accuracy']:.1%}", percent(r["closed_mouth_listening"]), percent(r["rest_mouth_listening"])]
            for r in rows]  # fmt: skip
    header = ["steps", "guidance", "FD ↓", "mouth corr ↑", "state acc ↑", "closed mouth listening ↑",
              "rest mouth listening ↑"]  # fmt: skip
    return _table(header, body)


def add_parser(commands) -> None:
    sub = commands.add_parser(
        "motion",
        help="the whole pipeline: generated talking/listening motion vs static, random and retrieval baselines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_generation_arguments(sub)
    sub.add_argument("--features", help="motion feature space .npz (default <checkpoint>/motion_features.npz; "
                     "fitted on the manifest's training clips when missing)")  # fmt: skip
    sub.add_argument("--bank-clips", type=int, default=12, help="training clips for the feature space and baselines")
    sub.add_argument("--sweep", action="store_true", help="also sweep DDIM steps x guidance scale")
    sub.add_argument("--sweep-steps", type=int, nargs="+", default=[10, 20, 40])
    sub.add_argument("--sweep-guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 2.5, 3.5])
    sub.add_argument("--sweep-items", type=int, default=3,
                     help="val clips for the sweep and --styles; dual-audio sides for the sweep")  # fmt: skip
    sub.add_argument("--styles", action="store_true", help="also measure each style preset against neutral")
    sub.set_defaults(handler=run_motion)


def add_generation_arguments(sub) -> None:
    """What `motion` and `motion-screen` share: inputs, output, the items' length and how the motion is generated."""
    sub.add_argument("--manifest", required=True, help="manifest.csv in the shared data format")
    sub.add_argument("--checkpoint", required=True, help="a complete pipeline folder (stage 1 + stage 2)")
    sub.add_argument("--json", help="write every result here")
    sub.add_argument("--max-seconds", type=float, default=10.0, help="cap per clip and per conversation side")
    sub.add_argument("--steps", type=int, default=20, help="DDIM steps of the generated method")
    sub.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE_SCALE)
    sub.add_argument("--window-overlap", type=int, help="frames shared by windows (default: the pipeline's)")
    sub.add_argument("--keep-portrait-mouth", dest="close_mouth", action="store_false",
                     help="animate parted lips as they are (the pipeline's close_mouth=False)")  # fmt: skip
    add_silent_mouth_argument(sub)
    sub.add_argument("--every-portrait", action="store_true",
                     help="a conversation side for every portrait of the manifest (the sides in turn), not only one "
                     "portrait per side: the listening mouth judged on every face")  # fmt: skip
    sub.add_argument("--sync-search", type=int, default=5,
                     help="frames either way searched by the lag-searched mouth correlation")  # fmt: skip
    sub.add_argument("--size", type=int, default=256)
    sub.add_argument("--fps", type=float, default=25.0)
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sub.add_argument("--no-progress", dest="progress", action="store_false")
