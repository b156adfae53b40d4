"""Shared fixtures of the training tests."""

import csv

import pytest

from training import prepare_data

CLIPS = {"styletalk-feifeili-clip1": "train", "video-retalkin-4": "val"}
SPEECH = "dreamtalk-french1"


@pytest.fixture(scope="session")
def data_dir(shared_data, tmp_path_factory):
    """A prepared dataset of one train clip, one val clip (1 s each), one portrait and one speech track."""
    tmp = tmp_path_factory.mktemp("head-data")
    with open(shared_data / "manifest.csv", newline="") as handle:
        manifest = list(csv.DictReader(handle))
    rows = [r for r in manifest if r["id"] in CLIPS or r["id"] == SPEECH]
    rows.append(next(r for r in manifest if r["kind"] == "portrait"))
    with open(tmp / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([dict(r, path=str(shared_data / r["path"])) for r in rows])
    out = tmp / "prepared"
    prepare_data.main(
        ["--manifest", str(tmp / "manifest.csv"), "--out", str(out), "--max-seconds", "1", "--workers", "1"]
    )
    return out
