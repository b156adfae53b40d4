"""How well `processing.diarize` splits one mixed recording into two speakers, on the manifest's labelled audio.

    python benchmarks/diarization.py --manifest ../shared/data/manifest.csv [--json OUT]

Cases: every `dual-audio` pair mixed into one track (truth: each track's own voice activity) and every `turns`
recording with an RTTM file of the same name (truth: its turns). Score: on frames where exactly one person
speaks and the splitter assigns someone, the fraction given to the right speaker, under the better of the two
ways of naming the clusters (0.5 is chance).
"""

import argparse
import json
from pathlib import Path

import numpy as np

from pipeline_infp.evaluate import read_manifest
from pipeline_infp.processing import load_audio, mix_tracks, voice_activity
from pipeline_infp.processing.diarize import FPS, split_speakers


def rttm_activity(path: Path, num_frames: int) -> np.ndarray:
    """[num_frames, speakers] bool from an RTTM file (SPEAKER lines: onset and duration in fields 4 and 5)."""
    names: dict[str, int] = {}
    turns = []
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == "SPEAKER":
            turns.append((float(fields[3]), float(fields[4]), names.setdefault(fields[7], len(names))))
    activity = np.zeros((num_frames, max(len(names), 2)), bool)
    for onset, duration, who in turns:
        activity[round(onset * FPS) : round((onset + duration) * FPS), who] = True
    return activity


def score(speaker: np.ndarray, activity: np.ndarray) -> dict:
    num_frames = min(len(speaker), len(activity))
    speaker, activity = speaker[:num_frames], activity[:num_frames, :2]
    single = activity.sum(1) == 1
    judged = single & (speaker > 0)
    truth = np.where(activity[:, 0], 1, 2)
    right = np.mean(speaker[judged] == truth[judged]) if judged.any() else float("nan")
    return {"accuracy": float(max(right, 1 - right)), "single_speaker_s": float(single.sum() / FPS),
            "assigned": float(judged.sum() / max(1, single.sum()))}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    entries = read_manifest(args.manifest)
    results = {}
    pairs: dict[str, list] = {}
    for entry in entries:
        if entry.kind == "dual-audio":
            pairs.setdefault(entry.identity, []).append(entry)
    for name, pair in sorted(pairs.items()):
        if len(pair) != 2:
            continue
        first, second = (load_audio(e.path) for e in sorted(pair, key=lambda e: e.id))
        mixed = mix_tracks(first, second)
        frames = round(len(mixed) / 16000 * FPS)
        activity = np.stack([voice_activity(t, frames, fps=FPS) > 0.5 for t in (first, second)], axis=1)
        results[f"dual-audio {name}"] = score(split_speakers(mixed).speaker, activity)
    for entry in entries:
        rttm = entry.path.with_suffix(".rttm")
        if entry.kind == "turns" and entry.path.suffix != ".rttm" and rttm.is_file():
            audio = load_audio(entry.path)
            speaker = split_speakers(audio).speaker
            results[f"turns {entry.id}"] = score(speaker, rttm_activity(rttm, len(speaker)))
    print("| recording | single-speaker s | assigned | accuracy |\n|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['single_speaker_s']:.1f} | {row['assigned']:.0%} | {row['accuracy']:.1%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
