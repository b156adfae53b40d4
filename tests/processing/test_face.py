import logging
import threading
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline_infp.processing import (
    FaceCrop,
    FaceProcessor,
    ImageLoadError,
    INFPInputError,
    NoFaceDetectedError,
    apply_landmark_offsets,
    apply_matrix,
    crop_matrix,
    eye_aperture,
    hybrid_representation,
    load_image,
    mouth_aperture,
    mouth_closing_motion,
    paste_back,
    read_video,
)
from pipeline_infp.processing.face import _region_indices


@pytest.fixture(scope="module")
def processor():
    with FaceProcessor() as fp:
        yield fp


@pytest.fixture(scope="module")
def portrait_path(shared_data):
    return shared_data / "portraits" / "liveportrait-source-s1.jpg"


@pytest.fixture(scope="module")
def crop(processor, portrait_path):
    return processor.crop_portrait(portrait_path)


def _bbox(landmarks):
    xy = landmarks[..., :2]
    return xy.min(axis=-2), xy.max(axis=-2)


# --------------------------------------------------------------------------- load_image


def test_load_image_path_pil_and_float_agree(portrait_path):
    from_path = load_image(portrait_path)
    assert from_path.dtype == np.uint8 and from_path.shape == (1145, 1145, 3)
    np.testing.assert_array_equal(load_image(Image.open(portrait_path)), from_path)
    np.testing.assert_array_equal(load_image(from_path.astype(np.float32) / 255.0), from_path)


def test_rgba_composited_on_white_and_grayscale_to_rgb(shared_data):
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[:, :32] = (255, 0, 0, 255)  # opaque red left half, transparent right half
    out = load_image(rgba)
    assert out.shape == (64, 64, 3)
    assert (out[:, :32] == (255, 0, 0)).all() and (out[:, 32:] == 255).all()

    png = load_image(shared_data / "portraits" / "dreamtalk-uncropped-face3.png")  # a real RGBA file
    assert png.shape == (682, 575, 3)

    gray = np.full((48, 40), 77, np.uint8)
    for arr in (gray, gray[..., None], Image.fromarray(gray), Image.fromarray(gray).convert("P")):
        out = load_image(arr)
        assert out.shape == (48, 40, 3) and (out == 77).all()


def test_grayscale_portrait_crops_to_three_channels(processor, portrait_path):
    gray = Image.open(portrait_path).convert("L").resize((512, 512))
    face = processor.crop_portrait(gray)
    assert face.image.shape == (256, 256, 3)
    assert (face.image[..., 0] == face.image[..., 1]).all()


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((0, 0, 3), np.uint8), "empty"),
        (np.zeros((20, 100, 3), np.uint8), "at least 32 px"),
        (np.zeros((64, 64, 3), np.int64), "dtype"),
        (np.zeros((3, 64, 64), np.uint8), "channels last"),
    ],
)
def test_bad_arrays_raise(bad, match):
    with pytest.raises(ImageLoadError, match=match):
        load_image(bad)


def test_missing_and_corrupt_files_raise(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff not really a jpeg" * 10)
    with pytest.raises(ImageLoadError, match="Could not read"):
        load_image(corrupt)
    assert issubclass(ImageLoadError, INFPInputError) and issubclass(ImageLoadError, ValueError)


def test_huge_image_rejected_naming_its_size(tmp_path):
    with pytest.raises(ImageLoadError, match=r"9000x6000 px \(54.0 megapixels\).*resize it below"):
        load_image(np.zeros((6000, 9000, 3), np.uint8))
    path = tmp_path / "huge.png"
    Image.new("L", (9000, 6000)).save(path)
    with pytest.raises(ImageLoadError, match="9000x6000"):
        load_image(path)


def test_large_image_is_downscaled_and_still_works(processor, portrait_path, caplog):
    big = cv2.resize(load_image(portrait_path), (3000, 2400), interpolation=cv2.INTER_LINEAR)
    with caplog.at_level(logging.INFO, logger="pipeline_infp.processing.face"):
        out = load_image(big)
    assert out.shape == (1638, 2048, 3)
    assert "downscaling" in caplog.text
    face = processor.crop_portrait(big)
    assert face.original.shape == (1638, 2048, 3) and face.image.shape == (256, 256, 3)


# --------------------------------------------------------------------------- detection / crop


def test_crop_is_centred_on_face_with_landmarks_inside(crop, portrait_path):
    assert crop.image.shape == (256, 256, 3) and crop.image.dtype == np.uint8
    assert crop.landmarks.shape == (478, 3) and crop.landmarks.dtype == np.float32
    lo, hi = _bbox(crop.landmarks)
    assert (lo >= 0).all() and (hi <= 256).all()
    np.testing.assert_allclose((lo + hi) / 2, [128, 128], atol=1.0)
    assert max(hi - lo) == pytest.approx(256 / 1.8, abs=1.0)
    assert crop.matrix.shape == (2, 3)
    assert crop.matrix[0, 1] == 0 and crop.matrix[1, 0] == 0  # upright: no rotation
    np.testing.assert_array_equal(crop.original, load_image(portrait_path))
    # The crop really is the original resampled through the matrix: the face pixels agree.
    back = cv2.warpAffine(crop.original, crop.matrix, (256, 256))
    assert np.abs(back[60:200, 60:200].astype(int) - crop.image[60:200, 60:200]).mean() < 1.0


def test_crop_size_and_scale(processor, crop):
    small = processor.crop_portrait(crop.original, size=128, scale=2.5)
    assert small.image.shape == (128, 128, 3)
    lo, hi = _bbox(small.landmarks)
    assert max(hi - lo) == pytest.approx(128 / 2.5, abs=1.0)


def test_landmarks_in_original_map_onto_crop(processor, crop):
    landmarks = processor.landmarks(crop.original)
    assert landmarks.shape == (478, 3)
    np.testing.assert_allclose(apply_matrix(landmarks, crop.matrix)[:, :2], crop.landmarks[:, :2], atol=1.0)
    np.testing.assert_allclose(crop_matrix(landmarks, 256, 1.8), crop.matrix, atol=1e-3)
    inverse = cv2.invertAffineTransform(crop.matrix)
    np.testing.assert_allclose(apply_matrix(apply_matrix(landmarks, crop.matrix), inverse), landmarks, atol=1e-2)


def test_detect_returns_sorted_pixel_boxes(processor, crop):
    boxes = processor.detect(crop.original)
    assert len(boxes) == 1
    x0, y0, x1, y1, score = boxes[0]
    lo, hi = _bbox(processor.landmarks(crop.original))
    assert x0 < (lo[0] + hi[0]) / 2 < x1 and y0 < (lo[1] + hi[1]) / 2 < y1
    assert 0.5 < score <= 1.0


@pytest.mark.parametrize("kind", ["blank", "noise"])
def test_no_face_raises(processor, kind):
    rng = np.random.default_rng(0)
    image = np.full((512, 512, 3), 255, np.uint8) if kind == "blank" else rng.integers(0, 256, (512, 512, 3), np.uint8)
    with pytest.raises(NoFaceDetectedError, match="No face found in the portrait.*clearly visible"):
        processor.crop_portrait(image)


def test_two_faces_warn_and_use_the_largest(processor, crop, shared_data):
    large = cv2.resize(crop.original, (512, 512), interpolation=cv2.INTER_AREA)
    other = load_image(shared_data / "portraits" / "v-express-tys-ref.jpg")
    small = cv2.resize(other, (256, 256), interpolation=cv2.INTER_AREA)
    pair = np.hstack([np.pad(small, ((0, 256), (0, 0), (0, 0))), large])
    with pytest.warns(UserWarning, match="Found 2 faces.*using the largest"):
        face = processor.crop_portrait(pair)
    centre = apply_matrix(np.array([[128.0, 128.0]]), cv2.invertAffineTransform(face.matrix))[0]
    assert centre[0] > 256 + 100  # inside the large face's half


def test_small_face_in_tall_image(processor, crop):
    canvas = np.full((2048, 1100, 3), 200, np.uint8)
    canvas[1700:1900, 800:1000] = cv2.resize(crop.original, (200, 200), interpolation=cv2.INTER_AREA)
    face = processor.crop_portrait(canvas)
    centre = apply_matrix(np.array([[128.0, 128.0]]), cv2.invertAffineTransform(face.matrix))[0]
    assert 850 < centre[0] < 950 and 1750 < centre[1] < 1850


def test_processor_is_thread_safe_and_reusable_after_close(crop):
    fp = FaceProcessor()
    expected = fp.landmarks(crop.original)
    results = [None] * 4

    def worker(i):
        results[i] = fp.landmarks(crop.original)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-3)
    fp.close()
    np.testing.assert_allclose(fp.landmarks(crop.original), expected, atol=1e-3)  # graphs re-created
    fp.close()


# --------------------------------------------------------------------------- paste back


def test_person_mask_covers_the_face_and_hair_not_the_background(processor, crop):
    mask = processor.person_mask(crop.image)
    assert mask.shape == crop.image.shape[:2] and mask.dtype == np.float32 and 0 <= mask.min() and mask.max() <= 1
    nose, forehead = (np.round(crop.landmarks[i, :2]).astype(int) for i in (1, 10))
    assert mask[nose[1], nose[0]] > 0.9 and mask[max(forehead[1] - 20, 0), forehead[0]] > 0.9  # hair above the brow
    assert mask[:16, :16].mean() < 0.1  # the wall behind
    assert np.array_equal(processor.person_mask(crop.image), mask)


def test_paste_back_round_trip(crop):
    out = paste_back(crop.image[None], crop)
    assert out.shape == (1, *crop.original.shape) and out.dtype == np.uint8
    diff = np.abs(out[0].astype(int) - crop.original).mean(axis=-1)
    lo, hi = _bbox(apply_matrix(crop.landmarks, cv2.invertAffineTransform(crop.matrix)))
    (x0, y0), (x1, y1) = lo.astype(int), hi.astype(int)
    assert diff[y0:y1, x0:x1].mean() < 4.0  # only resampling loss
    assert diff[:, :100].max() == 0 and diff[:100].max() == 0  # outside the crop: untouched

    # Generated at another resolution (512) and several frames: same result shape, still aligned.
    big = np.stack([cv2.resize(crop.image, (512, 512), interpolation=cv2.INTER_CUBIC)] * 2)
    out2 = paste_back(big, crop)
    assert out2.shape == (2, *crop.original.shape)
    assert np.abs(out2[1].astype(int) - crop.original).mean(axis=-1)[y0:y1, x0:x1].mean() < 5.0


def test_paste_back_blends_without_seam(crop):
    # Paste a white crop onto a black copy of the original: the result is the blend mask itself.
    black = FaceCrop(crop.image, crop.landmarks, crop.matrix, np.zeros_like(crop.original))
    white = np.full_like(crop.image, 255)
    inverse = cv2.invertAffineTransform(crop.matrix)
    cx, cy = apply_matrix(np.array([[128.0, 128.0]]), inverse)[0].astype(int)
    row = paste_back(white, black)[0, cy, :, 0].astype(int)
    assert row[cx] == 255  # centre fully replaced
    feathered = ((row > 10) & (row < 245)).sum()
    hard = paste_back(white, black, feather=0.0)[0, cy, :, 0]
    assert feathered > 20 > ((hard > 10) & (hard < 245)).sum()  # a gradual ramp, not a step
    assert np.abs(np.diff(row)).max() < 40


def test_paste_back_ignores_parts_outside_the_image(processor, crop):
    # A face at the very edge: the crop square sticks out of the image.
    edge = np.ascontiguousarray(crop.original[:, 300:])
    face = processor.crop_portrait(edge)
    out = paste_back(face.image, face)
    assert out.shape == (1, *edge.shape)


# --------------------------------------------------------------------------- hybrid representation


def test_hybrid_representation_keeps_only_eyes_lips_and_outline(crop):
    eyes, lips, oval, _ = _region_indices()
    image, lm = crop.image, crop.landmarks
    hybrid = hybrid_representation(image, lm)
    assert hybrid.shape == image.shape and hybrid.dtype == np.uint8

    # Everything outside generously dilated eye/lip hulls and the oval dots must be black.
    allowed = np.zeros(image.shape[:2], np.uint8)
    for idx in (*eyes, lips):
        cv2.fillConvexPoly(allowed, cv2.convexHull(np.round(lm[idx, :2]).astype(np.int32)), 255)
    allowed = cv2.dilate(allowed, np.ones((15, 15), np.uint8))
    for x, y in np.round(lm[oval, :2]).astype(int):
        cv2.circle(allowed, (x, y), 5, 255, -1)
    assert hybrid[allowed == 0].max() == 0
    assert (hybrid.sum(-1) > 0).mean() > 0.03  # and not trivially empty

    def same_as_image(point):
        x, y = np.round(point[:2]).astype(int)
        return (hybrid[y, x] == image[y, x]).all() and hybrid[y, x].any()

    assert same_as_image(lm[lips].mean(axis=0))  # mouth interior
    assert same_as_image(lm[468]) and same_as_image(lm[473])  # iris centres
    nose_x, nose_y = np.round(lm[4, :2]).astype(int)
    assert not hybrid[nose_y, nose_x].any()  # nose tip is dropped

    dots = {tuple(hybrid[y, x]) for x, y in np.round(lm[oval, :2]).astype(int)}
    assert len(dots) > len(oval) // 2  # colours change along the oval


def test_hybrid_representation_of_a_strided_image_equals_the_contiguous_ones(crop):
    strided = np.ascontiguousarray(crop.image.transpose(2, 0, 1)).transpose(1, 2, 0)  # a CHW tensor viewed as HWC
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(
        hybrid_representation(strided, crop.landmarks), hybrid_representation(crop.image, crop.landmarks)
    )


def test_hybrid_representation_is_fast(crop):
    hybrid_representation(crop.image, crop.landmarks)
    start = time.perf_counter()
    for _ in range(50):
        hybrid_representation(crop.image, crop.landmarks)
    assert (time.perf_counter() - start) / 50 < 0.01


# --------------------------------------------------------------------------- measures


def test_apertures(processor, shared_data, crop):
    open_mouth = processor.crop_portrait(shared_data / "portraits" / "liveportrait-driving-d9.jpg").landmarks
    closed = crop.landmarks
    assert mouth_aperture(open_mouth) > 0.3 > 0.05 > mouth_aperture(closed)
    assert 0.03 < eye_aperture(closed) < 0.2
    batch = np.stack([[open_mouth, closed]] * 3)  # [3, 2, 478, 3]
    assert mouth_aperture(batch).shape == (3, 2)
    assert mouth_aperture(batch)[2, 0] == pytest.approx(mouth_aperture(open_mouth))
    assert isinstance(eye_aperture(closed), float)


def test_mouth_closing_motion_is_the_least_motion_that_closes_the_lips(processor, shared_data, crop):
    open_mouth = processor.crop_portrait(shared_data / "portraits" / "liveportrait-driving-d9.jpg").landmarks
    iod = np.linalg.norm(open_mouth[33, :2] - open_mouth[263, :2])
    lower_half = open_mouth[:, 1] > open_mouth[14, 1] - 0.05 * iod  # the lower lip and the chin
    basis = np.zeros((3, 478, 3))
    basis[0, lower_half, 1] = -0.1  # a jaw closing by 0.1 inter-ocular distances per unit
    basis[1, [13, 82, 312], 1] = 0.05  # the upper inner lip coming down, half as far per unit
    basis[2, [33, 263], 0] = 0.1  # the eyes: nothing to do with the mouth
    coefficients = mouth_closing_motion(open_mouth, basis.reshape(3, -1), target=0.01)
    closed = apply_landmark_offsets(open_mouth, np.einsum("k,knd->nd", coefficients, basis))
    # From 0.47 to the target along the face's downward axis; what is left is the lips' sideways offset.
    assert mouth_aperture(open_mouth) > 0.4 and mouth_aperture(closed) < 0.03
    eye_line = closed[263, :2] - closed[33, :2]
    down = np.array([-eye_line[1], eye_line[0]]) / np.linalg.norm(eye_line)
    gap = (closed[[14, 87, 317], :2] - closed[[13, 82, 312], :2]) @ down
    assert gap.mean() / iod == pytest.approx(0.01, abs=1e-3)
    assert coefficients[2] == 0  # nothing spent elsewhere
    assert coefficients[0] == pytest.approx(2 * coefficients[1], rel=0.01)  # least norm: along the gradient
    # Lips pushed past each other (as generated motion can) are brought back to meet, not opened further.
    crossed = apply_landmark_offsets(open_mouth, np.einsum("k,knd->nd", 3 * coefficients, basis))
    back = apply_landmark_offsets(crossed, np.einsum("k,knd->nd", mouth_closing_motion(crossed, basis), basis))
    assert ((crossed[[14, 87, 317], :2] - crossed[[13, 82, 312], :2]) @ down).mean() < 0
    assert ((back[[14, 87, 317], :2] - back[[13, 82, 312], :2]) @ down).mean() / iod == pytest.approx(-0.01, abs=1e-3)
    # Lips that already meet need nothing; a basis that cannot move them gives nothing rather than a blow-up.
    assert not mouth_closing_motion(crop.landmarks, basis.reshape(3, -1), target=0.05).any()
    assert not mouth_closing_motion(open_mouth, basis[2:].reshape(1, -1)).any()
    # Meshes in a batch, each with its own target, get what each alone would.
    meshes = np.stack([open_mouth, crop.landmarks, open_mouth])
    batch = mouth_closing_motion(meshes, basis, np.array([0.01, 0.05, 0.2]))
    assert batch.shape == (3, 3)
    np.testing.assert_allclose(batch[0], coefficients)
    assert not batch[1].any()
    np.testing.assert_allclose(batch[2], mouth_closing_motion(open_mouth, basis, target=0.2))


# --------------------------------------------------------------------------- video tracking


def test_track_video_drops_faceless_frames_and_smooths_the_crop(processor, shared_data):
    frames, _ = read_video(shared_data / "video" / "spectre-lrs3-oza6jryjvqs-00004.mp4")
    frames = frames.copy()
    frames[[3, 10, 11]] = 0  # black frames: no face
    track = processor.track_video(frames, size=128)
    kept = len(frames) - 3
    assert track.dropped == 3
    assert track.indices.tolist() == [i for i in range(len(frames)) if i not in (3, 10, 11)]
    assert track.crops.shape == (kept, 128, 128, 3) and track.crops.dtype == np.uint8
    assert track.landmarks.shape == (kept, 478, 3) and track.matrices.shape == (kept, 2, 3)
    lo, hi = _bbox(track.landmarks)
    assert (lo > 0).all() and (hi < 128).all()

    # The crop box moves less jerkily than the raw per-frame face box.
    raw = np.array([processor.landmarks(frames[i]) for i in track.indices])
    raw_lo, raw_hi = _bbox(raw)
    raw_centre = (raw_lo + raw_hi) / 2
    crop_centre = np.array(
        [apply_matrix(np.array([[64.0, 64.0]]), cv2.invertAffineTransform(m))[0] for m in track.matrices]
    )
    assert np.abs(np.diff(crop_centre, 2, axis=0)).mean() < np.abs(np.diff(raw_centre, 2, axis=0)).mean()


def test_track_video_without_any_face_raises(processor):
    with pytest.raises(NoFaceDetectedError, match="any of the 4 video frames"):
        processor.track_video(np.zeros((4, 128, 128, 3), np.uint8))
