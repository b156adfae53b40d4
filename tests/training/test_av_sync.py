"""The sync expert finds clips whose sound is late, and leaves in-sync and speechless clips alone."""

import numpy as np

from training.av_sync import SyncClip, estimate_offsets


def synthetic_clips(late: dict[str, int], frames: int = 400, dim: int = 48, seed: int = 0) -> list[SyncClip]:
    """Six identities of two clips each. Features are a random smooth 'speech' signal; the mouth follows one
    direction of them (plus noise) at the same timeline frame, unless the clip is in `late`: then the sound of
    frame t sits at feature frame t + late[id]."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim)
    clips = []
    for person in range(6):
        for take in range(2):
            clip_id = f"p{person}-{take}"
            kernel = np.hanning(7) / np.hanning(7).sum()
            raw = np.stack([np.convolve(rng.normal(size=frames), kernel, "same") for _ in range(dim)], axis=1)
            features = raw + 0.05 * rng.normal(size=raw.shape)
            shift = late.get(clip_id, 0)
            spoken = raw @ direction
            mouth = np.roll(spoken, -shift) + 0.5 * spoken.std() * rng.normal(size=frames)
            kept = np.arange(10, frames - 10)  # frames at the ends are dropped, as faces sometimes are
            clips.append(SyncClip(clip_id, f"person-{person}", features.astype(np.float16), kept, mouth[kept]))
    return clips


def test_late_sound_is_found_and_in_sync_clips_keep_offset_zero():
    late = {"p1-0": 3, "p4-1": -2}
    results = estimate_offsets(synthetic_clips(late), max_offset=5)
    assert {clip_id: r.offset for clip_id, r in results.items() if r.offset} == late
    for result in results.values():
        assert len(result.curve) == 11 and result.correlation >= result.correlation_at_zero
        assert result.correlation > 0.5  # the expert predicts every clip well at its own offset
    assert results["p1-0"].correlation - results["p1-0"].correlation_at_zero > 0.2


def test_a_shift_at_the_edge_of_the_search_is_not_trusted():
    results = estimate_offsets(synthetic_clips({"p2-0": 4}), max_offset=4)
    assert results["p2-0"].offset == 0 and int(np.argmax(results["p2-0"].curve)) == 8
    assert estimate_offsets(synthetic_clips({"p2-0": 4}), max_offset=5)["p2-0"].offset == 4


def test_a_mouth_unrelated_to_the_sound_is_not_shifted():
    clips = synthetic_clips({})
    rng = np.random.default_rng(1)
    clips[0].mouth = rng.normal(size=len(clips[0].mouth))  # a clip whose mouth does not follow its speech
    results = estimate_offsets(clips, max_offset=5)
    assert results[clips[0].id].offset == 0 and results[clips[0].id].correlation < 0.3
    assert all(r.offset == 0 for r in results.values())


def test_one_identity_alone_has_no_expert_and_no_offset():
    clips = [c for c in synthetic_clips({"p0-0": 2}) if c.identity == "person-0"]
    results = estimate_offsets(clips)
    assert [r.offset for r in results.values()] == [0, 0] and all(not r.curve for r in results.values())
    assert estimate_offsets([]) == {}
