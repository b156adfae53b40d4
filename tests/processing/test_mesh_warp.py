"""Dense correspondence from two face meshes: triangles, backward flow, the mesh-warp baseline, retargeting."""

import cv2
import numpy as np
import pytest
import torch

from pipeline_infp.models.face_decoder import warp
from pipeline_infp.processing import (
    FaceProcessor,
    apply_landmark_offsets,
    landmark_offsets,
    lips_mask,
    mesh_flow,
    mesh_triangles,
    mesh_warp,
    mouth_aperture,
    moved_region,
    prior_flow,
    prior_warp,
    retarget_landmarks,
    warp_lock,
)
from pipeline_infp.processing.face import _region_indices
from pipeline_infp.processing.mesh_warp import _face_outline

SIZE = 256


@pytest.fixture(scope="module")
def processor():
    with FaceProcessor() as fp:
        yield fp


@pytest.fixture(scope="module")
def crop(processor, shared_data):
    return processor.crop_portrait(shared_data / "portraits" / "liveportrait-source-s1.jpg", size=SIZE)


@pytest.fixture(scope="module")
def landmarks(crop):
    return crop.landmarks.astype(np.float64)


def _edges(triangles):
    return {tuple(sorted((int(t[i]), int(t[j])))) for t in triangles for i, j in ((0, 1), (1, 2), (0, 2))}


def _oval_mask(landmarks, size, grow=0):
    _, _, oval, _ = _region_indices()
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(landmarks[oval, :2]).astype(np.int32)], 1)
    kernel = np.ones((2 * abs(grow) + 1,) * 2, np.uint8)
    return (cv2.dilate(mask, kernel) if grow > 0 else cv2.erode(mask, kernel) if grow < 0 else mask).astype(bool)


def _to_tensor(image):
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def _to_uint8(tensor):
    return (tensor[0].permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- triangles


def test_triangles_are_the_faces_of_the_tessellation():
    from mediapipe.python.solutions import face_mesh_connections as fmc

    triangles = mesh_triangles()
    assert triangles.ndim == 2 and triangles.shape[1] == 3 and 840 <= len(triangles) <= 900
    assert triangles.min() >= 0 and triangles.max() < 468
    assert all(len(set(t)) == 3 for t in triangles.tolist())
    assert len({tuple(sorted(t)) for t in triangles.tolist()}) == len(triangles)
    tessellation = {tuple(sorted(e)) for e in fmc.FACEMESH_TESSELATION}
    assert _edges(triangles) == tessellation  # every edge used, no edge invented
    # A manifold disc with three holes (eyes, mouth): Euler characteristic V - E + F = 1 - 3.
    vertices = np.unique(triangles)
    assert len(vertices) - len(tessellation) + len(triangles) == -2
    edge_use = {}
    for t in triangles.tolist():
        for e in _edges([t]):
            edge_use[e] = edge_use.get(e, 0) + 1
    assert max(edge_use.values()) == 2


def test_filled_mesh_is_a_disc():
    filled = mesh_triangles(fill_eyes=True, fill_mouth=True)
    assert np.array_equal(filled[: len(mesh_triangles())], mesh_triangles())
    assert set(np.unique(filled)) - set(range(468)) == {468, 473}  # the iris centres
    vertices, edges = np.unique(filled), _edges(filled)
    assert len(vertices) - len(edges) + len(filled) == 1


# --------------------------------------------------------------------------- flow


def test_identical_meshes_give_zero_flow_and_cover_the_face(landmarks):
    flow, mask = mesh_flow(landmarks, landmarks, SIZE, fill_mouth=True)
    assert flow.shape == (2, SIZE, SIZE) and mask.shape == (SIZE, SIZE)
    assert flow.dtype == np.float32 and mask.dtype == np.float32
    assert np.abs(flow).max() < 1e-6
    covered = mask > 0
    assert covered[_oval_mask(landmarks, SIZE, grow=-2)].all()  # no cracks or holes inside the face
    assert not covered[~_oval_mask(landmarks, SIZE, grow=2)].any()
    assert set(np.unique(mask)) == {0.0, 1.0}
    # Default: the mouth opening is left out, everything else is the same.
    _, default_mask = mesh_flow(landmarks, landmarks, SIZE)
    assert 0 <= (mask - default_mask).sum() < 0.01 * mask.sum() and (default_mask <= mask).all()


@pytest.mark.parametrize("out_size", [None, 64])
def test_translation_gives_constant_flow(landmarks, out_size):
    shift = np.array([7.0, -4.5, 0.0])
    flow, mask = mesh_flow(landmarks, landmarks + shift, SIZE, out_size)
    side = out_size or SIZE
    assert flow.shape == (2, side, side)
    inside = mask > 0
    # Backward flow: the driving pixel looks back at the source, `shift` pixels earlier, in [-1, 1] units.
    expected = -2 * shift[:2] / SIZE
    np.testing.assert_allclose(flow[:, inside].T, np.broadcast_to(expected, (inside.sum(), 2)), atol=1e-5)
    assert np.all(flow[:, ~inside] == 0)
    # The mask moved with the mesh.
    _, still = mesh_flow(landmarks, landmarks, SIZE, out_size)
    ys, xs = np.nonzero(inside)
    ys0, xs0 = np.nonzero(still > 0)
    scale = side / SIZE
    assert abs((xs.mean() - xs0.mean()) - shift[0] * scale) < 0.5 * scale + 0.2
    assert abs((ys.mean() - ys0.mean()) - shift[1] * scale) < 0.5 * scale + 0.2


def _affine(landmarks, angle=8.0, scale=1.1, shift=(6.0, -5.0)):
    centre = landmarks[:, :2].mean(axis=0)
    matrix = cv2.getRotationMatrix2D(tuple(centre), angle, scale)
    matrix[:, 2] += shift
    out = landmarks.copy()
    out[:, :2] = landmarks[:, :2] @ matrix[:, :2].T + matrix[:, 2]
    return out, matrix


def test_flow_through_face_decoder_warp_reconstructs_the_driving_geometry(landmarks):
    driving, matrix = _affine(landmarks)
    flow, mask = mesh_flow(landmarks, driving, SIZE)
    # A source image whose pixels hold their own coordinates: warping it shows where each output pixel sampled.
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    coords = torch.from_numpy(np.stack([xs, ys]))[None]
    sampled = warp(coords, torch.from_numpy(flow)[None])[0].numpy()
    inverse = cv2.invertAffineTransform(matrix)
    expected = np.einsum("ij,jhw->ihw", inverse[:, :2], np.stack([xs, ys])) + inverse[:, 2, None, None]
    inside = cv2.erode(mask, np.ones((3, 3), np.uint8)) > 0
    error = np.abs(sampled - expected)[:, inside]
    assert inside.sum() > 10000 and error.max() < 1e-2  # an affine map is reproduced exactly by every triangle
    # Outside the mesh the flow is zero: the identity.
    np.testing.assert_allclose(sampled[:, mask == 0], np.stack([xs, ys])[:, mask == 0], atol=1e-3)


def test_front_most_triangle_wins(landmarks):
    # Slide the right half of the face over the left half, once behind it and once in front of it
    # (MediaPipe's z: smaller is nearer the camera).
    centre = np.median(landmarks[:, 0])
    right = landmarks[:, 0] > centre
    shift = 40.0
    region = np.zeros((SIZE, SIZE), bool)  # covered by both halves once the right one has moved
    region[:, int(centre - shift + 8) : int(centre - 8)] = True
    region &= _oval_mask(landmarks, SIZE, grow=-10)
    fractions = {}
    for name, dz in (("behind", 1000.0), ("in front", -1000.0)):
        driving = landmarks.copy()
        driving[right, 0] -= shift
        driving[right, 2] += dz
        flow, mask = mesh_flow(landmarks, driving, SIZE)
        assert mask[region].all()
        # Showing the right half means sampling the source `shift` pixels further right.
        fractions[name] = (flow[0][region] > shift / SIZE).mean()
    assert fractions["behind"] < 0.05 and fractions["in front"] > 0.6, fractions


def test_mesh_flow_validates_its_input(landmarks):
    with pytest.raises(ValueError, match="478"):
        mesh_flow(landmarks[:100], landmarks[:100], SIZE)
    with pytest.raises(ValueError, match="478"):
        mesh_flow(landmarks, landmarks[:, :2][None], SIZE)


# --------------------------------------------------------------------------- real image


def _open_mouth(landmarks, amount):
    """Drop the lower lip and jaw by `amount` inter-ocular distances, fading out sideways."""
    iod = np.linalg.norm(landmarks[33, :2] - landmarks[263, :2])
    lips_mid = (landmarks[13, 1] + landmarks[14, 1]) / 2
    centre_x = (landmarks[78, 0] + landmarks[308, 0]) / 2
    below = np.clip((landmarks[:, 1] - lips_mid) / (0.05 * iod) + 0.5, 0, 1)
    sideways = np.exp(-0.5 * ((landmarks[:, 0] - centre_x) / (0.6 * iod)) ** 2)
    out = landmarks.copy()
    out[:, 1] += amount * iod * below * sideways
    return out


def test_warping_a_real_crop_opens_the_mouth(processor, crop, landmarks):
    target = _open_mouth(landmarks, 0.2)
    flow, _ = mesh_flow(landmarks, target, SIZE)
    out = _to_uint8(warp(_to_tensor(crop.image), torch.from_numpy(flow)[None]))
    before = processor.landmarks(crop.image)
    after = processor.landmarks(out)
    assert mouth_aperture(after) > mouth_aperture(before) + 0.07
    assert abs(mouth_aperture(after) - mouth_aperture(target)) < 0.06
    # MediaPipe finds the whole mesh where it was moved to.
    assert np.abs(after[:468, :2] - target[:468, :2]).mean() < 2.0
    # Far from the mouth the image is untouched.
    assert np.array_equal(out[:40], crop.image[:40])


def test_warp_lock_covers_the_face_and_a_band_round_it_but_not_the_mouth_opening(landmarks):
    opened = _open_mouth(landmarks, 0.2)
    lock = warp_lock(opened, SIZE, margin=0.1)
    assert lock.shape == (SIZE, SIZE) and lock.dtype == np.float32 and 0 <= lock.min() and lock.max() <= 1

    def at(points):
        x, y = np.round(np.atleast_2d(points)[:, :2].mean(axis=0)).astype(int)
        return lock[y, x]

    assert at(opened[1]) == 1 and at(opened[[234, 454]]) == 1  # nose tip; between the cheeks' edges
    assert at(opened[[13, 14]]) < 0.05  # between the parted inner lips (feathered edges): the decoder draws it
    assert lock[:4, :4].max() == 0 and lock[-4:, :4].max() == 0  # the crop's corners
    # The band: below the chin by a twentieth of the face, inside with margin 0.1, outside without one.
    chin = opened[152, :2]
    below = np.round(chin + [0, 0.05 * np.ptp(opened[:, 1])]).astype(int)
    assert lock[below[1], below[0]] > 0.99
    assert warp_lock(opened, SIZE, margin=0.0)[below[1], below[0]] < 0.5
    # Any output size: the same mask, resampled.
    half = warp_lock(opened, SIZE, out_size=SIZE // 2, margin=0.1)
    resized = cv2.resize(lock, (SIZE // 2,) * 2, interpolation=cv2.INTER_AREA)
    assert half.shape == (SIZE // 2,) * 2 and np.abs(half - resized).mean() < 0.02


def test_lips_mask_covers_the_lips_and_little_else(landmarks):
    mask = lips_mask(landmarks, SIZE, 64)
    assert mask.shape == (64, 64) and mask.dtype == np.float32
    for point in (13, 14, 61, 291, 0, 17):  # inner lip centres, mouth corners, outer lip centres
        x, y = np.round(landmarks[point, :2] * 64 / SIZE).astype(int)
        assert mask[y, x] == 1
    eye_x, eye_y = np.round(landmarks[33, :2] * 64 / SIZE).astype(int)
    assert mask[eye_y, eye_x] == 0 and mask.mean() < 0.1


def test_mesh_warp_matches_the_flow_and_keeps_the_rest(crop, landmarks):
    driving, _ = _affine(landmarks, angle=5.0, scale=1.05, shift=(3.0, 2.0))
    out = mesh_warp(crop.image, landmarks, driving)
    assert out.dtype == np.uint8 and out.shape == crop.image.shape
    flow, mask = mesh_flow(landmarks, driving, SIZE, fill_mouth=True)
    reference = _to_uint8(warp(_to_tensor(crop.image), torch.from_numpy(flow)[None]))
    inside = cv2.erode(mask, np.ones((3, 3), np.uint8)) > 0
    assert np.abs(out.astype(int) - reference.astype(int))[inside].mean() < 1.0
    assert np.array_equal(out[mask == 0], crop.image[mask == 0])
    # Same geometry: the source itself.
    assert np.array_equal(mesh_warp(crop.image, landmarks, landmarks), crop.image)


def test_mesh_warp_works_at_the_full_resolution_of_any_image(crop, landmarks):
    wide = cv2.copyMakeBorder(crop.image, 10, 30, 50, 0, cv2.BORDER_REFLECT)  # 296 x 306, face off-centre
    offset = np.array([50.0, 10.0, 0.0])
    step = np.array([4.0, -3.0, 0.0])
    out = mesh_warp(wide, landmarks + offset, landmarks + offset + step)
    assert out.shape == wide.shape
    assert np.array_equal(out[:, :45], wide[:, :45])
    # The same warp as on the crop itself, where the face is.
    on_crop = mesh_warp(crop.image, landmarks, landmarks + step)
    _, mask = mesh_flow(landmarks, landmarks + step, SIZE, fill_mouth=True)
    inside = cv2.erode(mask, np.ones((5, 5), np.uint8)) > 0
    assert np.array_equal(out[10 : 10 + SIZE, 50 : 50 + SIZE][inside], on_crop[inside])


# --------------------------------------------------------------------------- retargeting


def test_retarget_moves_by_the_scaled_driver_motion(landmarks):
    portrait = landmarks.astype(np.float32)
    reference = (landmarks * 0.5 + 20).astype(np.float32)  # a driver with a face half as large
    np.testing.assert_allclose(retarget_landmarks(portrait, reference, reference), portrait, atol=1e-5)
    driver = reference + np.array([3.0, -2.0, 1.0], np.float32)
    moved = retarget_landmarks(portrait, driver, reference)
    np.testing.assert_allclose(moved - portrait, np.broadcast_to([6.0, -4.0, 2.0], portrait.shape), atol=1e-4)
    batch = retarget_landmarks(portrait, np.stack([reference, driver]), reference)
    assert batch.shape == (2, *portrait.shape) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[1], moved, atol=1e-5)
    # The mouth opens by the same relative amount on the portrait.
    opened = retarget_landmarks(portrait, _open_mouth(reference, 0.2), reference)
    assert abs(mouth_aperture(opened) - mouth_aperture(_open_mouth(portrait, 0.2))) < 1e-3


# --------------------------------------------------------------------------- prior flow and offsets


def test_prior_flow_is_zero_for_identical_meshes(landmarks):
    flow, mask = prior_flow(landmarks, landmarks, SIZE, 64)
    assert flow.shape == (2, 64, 64) and mask.shape == (64, 64)
    np.testing.assert_allclose(flow, 0, atol=1e-6)


def test_prior_flow_carries_the_mesh_motion_outwards_and_fades_to_still(landmarks):
    shift = 6.0  # px at SIZE: every output pixel near the face samples the source 6 px to its left
    moved = landmarks.copy()
    moved[:, 0] += shift
    flow, mask = prior_flow(landmarks, moved, SIZE, 64)
    expected = -2 * shift / SIZE
    inside = mask > 0
    np.testing.assert_allclose(flow[0][inside], expected, atol=1e-5)
    np.testing.assert_allclose(flow[1][inside], 0, atol=1e-5)
    # Just outside the mesh (a few pixels off the face oval) the motion continues, weaker ...
    ring = _oval_mask(moved * 64 / SIZE, 64, grow=3) & ~inside
    ratio = flow[0][ring] / expected
    assert ring.any() and ratio.min() > 0.3 and ratio.mean() > 0.5
    # ... and the crop's corners, far from the face, stay still.
    assert np.abs(flow[:, :4, :4]).max() < 1e-3 and np.abs(flow[:, -4:, -4:]).max() < 1e-3


def test_person_prior_moves_hair_with_the_head_and_fills_what_it_uncovers_with_background(landmarks):
    person = _oval_mask(landmarks, SIZE, grow=24).astype(np.float32)  # the head with its hair, on a background
    np.testing.assert_allclose(prior_flow(landmarks, landmarks, SIZE, 64, person_mask=person)[0], 0, atol=1e-6)
    shift = 6.0
    moved = landmarks.copy()
    moved[:, 0] += shift
    flow, mask = prior_flow(landmarks, moved, SIZE, person_mask=person)
    plain, _ = prior_flow(landmarks, moved, SIZE)
    inside = mask > 0
    np.testing.assert_allclose(flow[:, inside], plain[:, inside])  # the mesh's own flow inside it
    # Hair 16 px off the face oval moves with the head, where the plain prior lets it lag behind by half.
    ring = _oval_mask(moved, SIZE, grow=16) & ~_oval_mask(moved, SIZE, grow=14) & ~inside
    expected = -2 * shift / SIZE
    assert flow[0][ring].mean() / expected > 0.8 and plain[0][ring].mean() / expected < 0.6
    # Where the person moved away (background in the driving frame, the head in the source), the plain prior copies
    # the old head; the person prior mostly stretches the nearest background in.
    background = (cv2.warpAffine(person, np.float32([[1, 0, shift], [0, 1, 0]]), (SIZE, SIZE)) < 0.5) & ~inside
    uncovered = background & (person > 0.5)
    grid_x, grid_y = np.meshgrid(np.arange(SIZE), np.arange(SIZE))

    def samples_person(flow):
        x = np.clip(np.round(grid_x + flow[0] * SIZE / 2), 0, SIZE - 1).astype(int)
        y = np.clip(np.round(grid_y + flow[1] * SIZE / 2), 0, SIZE - 1).astype(int)
        return person[y, x]

    assert uncovered.sum() > 500
    assert samples_person(flow)[uncovered].mean() < 0.4 and samples_person(plain)[uncovered].mean() > 0.8
    assert samples_person(flow)[background].mean() < 0.02
    assert np.abs(flow[:, :4, :4]).max() == 0  # far background stays still


def _turned(landmarks, degrees):
    """The mesh turned (yaw) about a vertical axis through the plane where the rigid prior puts the hair."""
    outline = _face_outline()
    centre = np.array(
        [landmarks[outline, 0].mean(), 0.0, landmarks[outline, 2].mean() + 0.3 * np.ptp(landmarks[outline, 0])]
    )
    angle = np.deg2rad(degrees)
    turn = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    return (landmarks - centre) @ turn.T + centre


def test_rigid_person_prior_turns_the_hair_about_the_head_where_the_affine_one_drags_it(landmarks):
    person = _oval_mask(landmarks, SIZE, grow=40).astype(np.float32)
    still = prior_flow(landmarks, landmarks, SIZE, 64, person_mask=person, head_motion="rigid")[0]
    np.testing.assert_allclose(still, 0, atol=1e-5)
    shift = 6.0  # a head moved sideways: both carry the hair along with it
    moved = landmarks.copy()
    moved[:, 0] += shift
    rigid, mask = prior_flow(landmarks, moved, SIZE, person_mask=person, head_motion="rigid")
    affine, _ = prior_flow(landmarks, moved, SIZE, person_mask=person)
    np.testing.assert_allclose(rigid[:, mask > 0], affine[:, mask > 0])  # the mesh's own flow inside it
    ring = _oval_mask(moved, SIZE, grow=16) & ~_oval_mask(moved, SIZE, grow=14) & ~(mask > 0)
    assert rigid[0][ring].mean() / (-2 * shift / SIZE) > 0.8
    # A turn of the head: the face's front (the outline) moves sideways, the hair above the head's centre stays.
    turned = _turned(landmarks, 12)
    outline = _face_outline()
    assert abs(turned[outline, 0].mean() - landmarks[outline, 0].mean()) > 5
    rigid, mask = prior_flow(landmarks, turned, SIZE, person_mask=person, head_motion="rigid")
    affine, _ = prior_flow(landmarks, turned, SIZE, person_mask=person)
    above = round(turned[outline, 1].min()) - 30
    columns = slice(round(turned[outline, 0].mean()) - 10, round(turned[outline, 0].mean()) + 10)
    assert not mask[above, columns].any() and person[above, columns].all()
    assert np.abs(rigid[0, above, columns] * SIZE / 2).max() < 0.5
    assert np.abs(affine[0, above, columns] * SIZE / 2).mean() > 5
    # A jaw that opens leaves the skull, and so the hair above it, where it was.
    below_nose = landmarks[:, 1] > landmarks[1, 1]
    opened = landmarks.copy()
    opened[below_nose, 1] += 8 * (landmarks[below_nose, 1] - landmarks[1, 1]) / np.ptp(landmarks[below_nose, 1])
    rigid, _ = prior_flow(landmarks, opened, SIZE, person_mask=person, head_motion="rigid")
    affine, _ = prior_flow(landmarks, opened, SIZE, person_mask=person)
    above = round(landmarks[outline, 1].min()) - 30
    columns = slice(round(landmarks[outline, 0].mean()) - 10, round(landmarks[outline, 0].mean()) + 10)
    assert np.abs(rigid[:, above, columns] * SIZE / 2).max() < 0.1
    assert np.abs(affine[1, above, columns] * SIZE / 2).mean() > 1
    with pytest.raises(ValueError, match="head_motion"):
        prior_flow(landmarks, turned, SIZE, person_mask=person, head_motion="3d")


def test_moved_region_covers_what_the_motion_moves_and_nothing_else(landmarks):
    assert not moved_region(landmarks, landmarks, SIZE).any()
    jaw = landmarks.copy()
    below_mouth = landmarks[:, 1] > landmarks[14, 1]
    jaw[below_mouth, 1] -= 5.0  # px: the jaw closes
    weight = moved_region(landmarks, jaw, SIZE)
    assert weight.shape == (SIZE, SIZE) and weight.dtype == np.float32 and 0 <= weight.min() and weight.max() <= 1
    chin = np.round(jaw[152, :2]).astype(int)
    forehead = np.round(landmarks[10, :2]).astype(int)
    assert weight[chin[1], chin[0]] == pytest.approx(1) and weight[forehead[1], forehead[0]] == 0
    assert ((weight > 0.1) & (weight < 0.9)).any()  # a feathered edge, not a hard cut
    assert not weight[:8].any()  # the top of the crop stays as it was


def test_landmark_offsets_round_trip_and_transfer_at_the_other_faces_scale(landmarks):
    driver = landmarks.copy()
    driver[:, 1] += 3.0
    offsets = landmark_offsets(driver, landmarks)
    np.testing.assert_allclose(apply_landmark_offsets(landmarks, offsets), driver, atol=1e-4)
    bigger = landmarks * 2  # the same face twice as large: the same motion is twice as many pixels
    np.testing.assert_allclose(apply_landmark_offsets(bigger, offsets) - bigger, (driver - landmarks) * 2, atol=1e-4)
    np.testing.assert_allclose(landmark_offsets(np.stack([landmarks, driver]), landmarks)[1], offsets)


def test_prior_warp_matches_the_flow_through_the_decoders_warp(crop, landmarks):
    driving = landmarks.copy()
    driving[:, 1] += 4.0
    assert np.array_equal(prior_warp(crop.image, landmarks, landmarks), crop.image)
    warped = prior_warp(crop.image, landmarks, driving)
    flow, _ = prior_flow(landmarks, driving, SIZE)
    expected = _to_uint8(warp(_to_tensor(crop.image), torch.from_numpy(flow)[None]))
    assert np.abs(warped.astype(int) - expected).mean() < 1.0
