"""Dense correspondence between two MediaPipe face meshes.

Two uses: the "mesh warp" baseline of the evaluation (a piecewise-affine warp of the portrait by a
driving mesh) and the supervision of the renderer's flow estimator (`mesh_flow` gives the backward
flow a perfect renderer would predict inside the face, in the same normalised convention as
`pipeline_infp.models.face_decoder.warp`).

Rasterisation is vectorised numpy: every (triangle, pixel) pair inside a triangle's bounding box is
enumerated at once, barycentric coordinates tell which pixels a triangle covers, and a z-buffer keeps
the front-most triangle per pixel (MediaPipe's z is smaller nearer the camera), so a turned head never
maps through the back of the face.

Coordinates: landmarks are pixel coordinates with pixel centres at integers (OpenCV / `apply_matrix`);
normalised coordinates follow grid_sample(align_corners=False): pixel x ↦ (2x + 1) / w − 1.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from ..motion_features import align
from .face import _EYE_OUTER_CORNERS, _face_size, _region_indices

__all__ = [
    "apply_landmark_offsets",
    "landmark_offsets",
    "lips_mask",
    "mesh_flow",
    "mesh_triangles",
    "mesh_warp",
    "moved_region",
    "prior_flow",
    "prior_warp",
    "retarget_landmarks",
    "warp_lock",
]

# Fill triangles (eye and mouth openings) lose z-ties against the real surface by this fraction of the
# face size, so where a fan overlaps an eyelid the eyelid wins.
_FILL_Z_BIAS = 0.02
HEAD_MOTIONS = ("affine", "rigid")  # how the person prior carries hair, ears and neck with the head (`prior_flow`)


def _edge_graph() -> tuple[set[tuple[int, int]], dict[int, set[int]]]:
    from mediapipe.python.solutions import face_mesh_connections as fmc

    edges = {(min(a, b), max(a, b)) for a, b in fmc.FACEMESH_TESSELATION if a != b}
    neighbours: dict[int, set[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    return edges, neighbours


@functools.cache
def _tessellation() -> np.ndarray:
    edges, neighbours = _edge_graph()
    cliques = {tuple(sorted((a, b, c))) for a, b in edges for c in neighbours[a] & neighbours[b]}
    # A 3-clique is not always a face: three faces fanned round a vertex of degree 3 make their outer
    # cycle a 3-clique too, lying over them. Drop those (vertex adjacent to all three, every pair a face).
    faces = []
    for tri in sorted(cliques):
        a, b, c = tri
        hubs = neighbours[a] & neighbours[b] & neighbours[c]
        covered = any(
            {tuple(sorted((h, a, b))), tuple(sorted((h, b, c))), tuple(sorted((h, a, c)))} <= cliques
            and len(neighbours[h]) == 3
            for h in hubs
        )
        if not covered:
            faces.append(tri)
    return np.array(faces, dtype=np.int64)


def _boundary_cycles(triangles: np.ndarray) -> list[list[int]]:
    """Closed boundary loops of a triangle mesh (edges used by exactly one triangle), longest first."""
    count: dict[tuple[int, int], int] = {}
    for tri in triangles:
        for i, j in ((0, 1), (1, 2), (0, 2)):
            edge = (min(tri[i], tri[j]), max(tri[i], tri[j]))
            count[edge] = count.get(edge, 0) + 1
    neighbours: dict[int, list[int]] = {}
    for (a, b), n in count.items():
        if n == 1:
            neighbours.setdefault(int(a), []).append(int(b))
            neighbours.setdefault(int(b), []).append(int(a))
    cycles, seen = [], set()
    for start in sorted(neighbours):
        if start in seen:
            continue
        cycle, prev = [start], None
        while True:
            nxt = next(n for n in neighbours[cycle[-1]] if n != prev)
            if nxt == start:
                break
            prev = cycle[-1]
            cycle.append(nxt)
        seen.update(cycle)
        cycles.append(cycle)
    return sorted(cycles, key=len, reverse=True)


@functools.cache
def _mouth_ring() -> list[int]:
    """The mouth opening's boundary (the inner lips) in order round it, from MediaPipe's own topology: the hole of
    the tessellation made of lip points that holds the lip centres 13 and 14 (the pair `mouth_aperture` measures)."""
    from mediapipe.python.solutions import face_mesh_connections as fmc

    lips = {i for edge in fmc.FACEMESH_LIPS for i in edge}
    return next(c for c in _boundary_cycles(_tessellation())[1:] if set(c) <= lips and {13, 14} <= set(c))


@functools.cache
def _hole_fills() -> tuple[np.ndarray, np.ndarray]:
    """Triangles closing the eye openings (a fan from each iris centre: the eyeball moves with the
    iris) and the mouth opening (a strip between upper and lower inner lip, corner to corner)."""
    from mediapipe.python.solutions import face_mesh_connections as fmc

    cycles = _boundary_cycles(_tessellation())
    eye_sets = {
        # MediaPipe's refined landmarks list each iris centre just before its 4 contour points.
        min(i for edge in iris for i in edge) - 1: {i for edge in eye for i in edge}
        for eye, iris in (
            (fmc.FACEMESH_LEFT_EYE, fmc.FACEMESH_LEFT_IRIS),
            (fmc.FACEMESH_RIGHT_EYE, fmc.FACEMESH_RIGHT_IRIS),
        )
    }
    eyes = []
    for cycle in cycles[1:]:  # cycles[0] is the face oval
        centre = next((c for c, ring in eye_sets.items() if set(cycle) <= ring), None)
        if centre is not None:
            eyes += [(centre, cycle[i], cycle[(i + 1) % len(cycle)]) for i in range(len(cycle))]
    # The inner-lip ring: start at the corner half-way between the upper (13) and lower (14) lip centres, then
    # zig-zag between the two sides.
    cycle, mouth = _mouth_ring(), []
    n = len(cycle)
    gap = (cycle.index(14) - cycle.index(13)) % n
    ring = np.roll(cycle, -((cycle.index(13) + gap // 2) % n)).tolist()
    upper = ring[: n // 2 + 1]
    lower = [ring[0]] + ring[::-1][: n // 2]
    for k in range(n // 2):
        for tri in ((upper[k], upper[k + 1], lower[k + 1]), (upper[k], lower[k + 1], lower[k])):
            if len(set(tri)) == 3:
                mouth.append(tri)
    return np.array(eyes, dtype=np.int64).reshape(-1, 3), np.array(mouth, dtype=np.int64).reshape(-1, 3)


@functools.cache
def mesh_triangles(fill_eyes: bool = False, fill_mouth: bool = False) -> np.ndarray:
    """Triangles [F, 3] (int64 vertex indices) of MediaPipe's face mesh, the 3-cliques of its
    tessellation graph (852 faces over the 468 mesh points; the eye and mouth openings are holes).
    `fill_eyes` adds fans from the iris centres (needs the 478 refined landmarks), `fill_mouth` a strip
    across the inner lips. The fills come after the tessellation. Read-only (cached)."""
    parts = [_tessellation()]
    eyes, mouth = _hole_fills()
    if fill_eyes:
        parts.append(eyes)
    if fill_mouth:
        parts.append(mouth)
    out = np.concatenate(parts)
    out.setflags(write=False)
    return out


# --------------------------------------------------------------------------- rasterisation


def _rasterise(
    points: np.ndarray, depth: np.ndarray, triangles: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Front-most triangle per pixel centre of a height x width grid.

    points: [N, 2] pixel coords, depth: [N] (smaller = nearer), triangles: [F, 3].
    Returns (flat pixel indices [P], triangle ids [P], barycentric coordinates [P, 3]).
    """
    tri = points[triangles]  # [F, 3, 2]
    a = tri[:, 0]
    e1, e2 = tri[:, 1] - a, tri[:, 2] - a
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    lo = np.ceil(tri.min(axis=1) - 1e-6).astype(np.int64)
    hi = np.floor(tri.max(axis=1) + 1e-6).astype(np.int64)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, [width - 1, height - 1])
    nx = np.maximum(hi[:, 0] - lo[:, 0] + 1, 0)
    ny = np.maximum(hi[:, 1] - lo[:, 1] + 1, 0)
    valid = np.abs(det) > 1e-9
    counts = np.where(valid, nx * ny, 0)
    total = int(counts.sum())
    empty = np.zeros(0, np.int64)
    if total == 0:
        return empty, empty, np.zeros((0, 3), np.float64)

    ids = np.repeat(np.arange(len(triangles)), counts)
    local = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    row_len = nx[ids]
    px = lo[ids, 0] + local % row_len
    py = lo[ids, 1] + local // row_len

    dx, dy = px - a[ids, 0], py - a[ids, 1]
    inv = 1.0 / det[ids]
    l1 = (dx * e2[ids, 1] - dy * e2[ids, 0]) * inv
    l2 = (e1[ids, 0] * dy - e1[ids, 1] * dx) * inv
    l0 = 1.0 - l1 - l2
    eps = -1e-7  # pixel centres exactly on a shared edge belong to both triangles: no cracks
    inside = (l0 >= eps) & (l1 >= eps) & (l2 >= eps)
    ids, px, py = ids[inside], px[inside], py[inside]
    bary = np.stack([l0[inside], l1[inside], l2[inside]], axis=1)
    pix = py * width + px
    z = np.einsum("pk,pk->p", bary, depth[triangles[ids]])

    order = np.lexsort((z, pix))  # by pixel, then nearest first
    pix, ids, bary = pix[order], ids[order], bary[order]
    first = np.ones(len(pix), dtype=bool)
    first[1:] = pix[1:] != pix[:-1]
    return pix[first], ids[first], bary[first]


def _prepare(
    source_landmarks: np.ndarray, driving_landmarks: np.ndarray, fill_eyes: bool, fill_mouth: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(source xy [N, 2], driving xy [N, 2], driving depth [N], triangles [F, 3]) as float64 / int64."""
    source = np.asarray(source_landmarks, dtype=np.float64)
    driving = np.asarray(driving_landmarks, dtype=np.float64)
    if source.ndim != 2 or source.shape != driving.shape or source.shape[1] not in (2, 3) or len(source) < 468:
        raise ValueError(
            f"Expected two landmark arrays shaped [478, 3] (or [468, 3]), got {source.shape} and {driving.shape}."
        )
    triangles = mesh_triangles(fill_eyes=fill_eyes and len(source) >= 478, fill_mouth=fill_mouth)
    depth = driving[:, 2] if driving.shape[1] == 3 else np.zeros(len(driving))
    return source[:, :2], driving[:, :2], depth, triangles


def _front_faces(
    driving_xy: np.ndarray, depth: np.ndarray, triangles: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_rasterise` with the fill triangles (after the tessellation's) pushed back a little in depth, via
    their own vertex copies, so the real surface wins where a fill overlaps it."""
    num_real = len(_tessellation())
    if len(triangles) == num_real:
        return _rasterise(driving_xy, depth, triangles, height, width)
    extra = triangles[num_real:].ravel()
    span = float(np.ptp(driving_xy, axis=0).max())
    points = np.concatenate([driving_xy, driving_xy[extra]])
    depths = np.concatenate([depth, depth[extra] + _FILL_Z_BIAS * span])
    remapped = np.concatenate([triangles[:num_real], len(driving_xy) + np.arange(extra.size).reshape(-1, 3)])
    return _rasterise(points, depths, remapped, height, width)


def mesh_flow(
    source_landmarks: np.ndarray,
    driving_landmarks: np.ndarray,
    size: int,
    out_size: int | None = None,
    *,
    fill_eyes: bool = True,
    fill_mouth: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Backward flow from the driving mesh to the source mesh.

    source_landmarks, driving_landmarks: [478, 3] pixel coords in a `size` x `size` crop.
    Returns `flow` float32 [2, h, w] (x, y), h = w = out_size or size: for every output pixel covered by
    the driving mesh, the displacement in normalised [-1, 1] coordinates to the same surface point in the
    source (0 elsewhere), so that `grid_sample(source, identity_grid + flow, align_corners=False)` — or
    `face_decoder.warp(source, flow)` — gives the source with the driving geometry; and `mask` float32
    [h, w], 1 where the driving mesh covers the pixel. The eye openings are covered by iris-centred fans
    (`fill_eyes`); the mouth opening is left out by default (its inside has no source counterpart when the
    source's mouth is closed), `fill_mouth=True` stretches the lips across it.
    """
    out = int(out_size or size)
    src_xy, drv_xy, depth, triangles = _prepare(source_landmarks, driving_landmarks, fill_eyes, fill_mouth)
    # Driving mesh in output pixels (pixel centres at integers at both resolutions).
    drv_out = (drv_xy + 0.5) * (out / size) - 0.5
    pix, ids, bary = _front_faces(drv_out, depth, triangles, out, out)
    src_pix = np.einsum("pk,pkc->pc", bary, src_xy[triangles[ids]])
    src_norm = (2.0 * src_pix + 1.0) / size - 1.0
    ys, xs = np.divmod(pix, out)
    out_norm = (2.0 * np.stack([xs, ys], axis=1) + 1.0) / out - 1.0
    flow = np.zeros((2, out * out), dtype=np.float32)
    flow[:, pix] = (src_norm - out_norm).T
    mask = np.zeros(out * out, dtype=np.float32)
    mask[pix] = 1.0
    return flow.reshape(2, out, out), mask.reshape(out, out)


def mesh_warp(
    source_image: np.ndarray,
    source_landmarks: np.ndarray,
    driving_landmarks: np.ndarray,
    *,
    fill_eyes: bool = True,
    fill_mouth: bool = True,
) -> np.ndarray:
    """The "mesh warp" baseline: the source image (uint8 [H, W, 3]) warped piecewise-affinely so that its
    face takes the driving mesh's shape. Landmarks are in the source image's pixel coords; pixels outside
    the driving mesh keep the source pixel. Returns uint8 [H, W, 3] at the source's resolution."""
    image = np.asarray(source_image)
    height, width = image.shape[:2]
    src_xy, drv_xy, depth, triangles = _prepare(source_landmarks, driving_landmarks, fill_eyes, fill_mouth)
    pix, ids, bary = _front_faces(drv_xy, depth, triangles, height, width)
    src_pix = np.einsum("pk,pkc->pc", bary, src_xy[triangles[ids]])
    map_x, map_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    map_x.ravel()[pix] = src_pix[:, 0]
    map_y.ravel()[pix] = src_pix[:, 1]
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def prior_flow(
    source_landmarks: np.ndarray,
    driving_landmarks: np.ndarray,
    size: int,
    out_size: int | None = None,
    *,
    spread: float = 0.08,
    reach: float = 0.3,
    person_mask: np.ndarray | None = None,
    head_motion: str = "affine",
) -> tuple[np.ndarray, np.ndarray]:
    """The renderer's geometric prior: `mesh_flow` (lips stretched across the mouth) inside the driving
    mesh, carried outwards over hair, ears and neck and fading to no motion further away.

    Outside the mesh the flow is a normalised Gaussian average of the mesh's flow (σ = `spread` × the output
    side), weighted by how much mesh lies near (full weight where the blurred mesh mask reaches `reach`), so
    the background of a fixed crop stays put. With the source's `person_mask` [size, size] (`FaceProcessor.
    person_mask`) the head's motion is carried further, over the person only, as `head_motion` ("affine" or
    "rigid") says: see `_person_prior`.
    Returns (flow float32 [2, h, w], mesh mask float32 [h, w]) as `mesh_flow`.
    """
    flow, mask = mesh_flow(source_landmarks, driving_landmarks, size, out_size, fill_mouth=True)
    if person_mask is not None:
        return _person_prior(flow, mask, source_landmarks, driving_landmarks, size, person_mask, head_motion), mask
    sigma = spread * mask.shape[0]
    weight = cv2.GaussianBlur(mask, (0, 0), sigma)
    spreading = np.stack([cv2.GaussianBlur(channel * mask, (0, 0), sigma) for channel in flow])
    outside = spreading / np.maximum(weight, 1e-6) * np.clip(weight / reach, 0, 1)
    return np.where(mask > 0, flow, outside).astype(np.float32), mask


def _person_prior(
    flow: np.ndarray,
    mask: np.ndarray,
    source_landmarks: np.ndarray,
    driving_landmarks: np.ndarray,
    size: int,
    person_mask: np.ndarray,
    head_motion: str = "affine",
    *,
    spread: float = 0.04,
    reach: float = 0.3,
) -> np.ndarray:
    """`prior_flow` outside the mesh from the source's person mask: hair, ears and neck follow the head's motion,
    blended with the mesh's own flow near it and fading with distance d from it (e^-(d / r)², r in crop sides) so
    shoulders move less; pixels whose moved position falls on the background keep still; background the moving
    head uncovers is taken from the nearest background pixel of the source rather than from where the head was.

    `head_motion` "affine": the 2-D affine motion of the face outline, r = 0.2 everywhere. Prior warp on the val
    clips (every 8th frame): SSIM 0.736 → 0.763, PSNR 19.5 → 20.7 dB (the `around` band 0.576 → 0.644,
    `elsewhere` 0.787 → 0.800). "rigid": the head's 3-D rotation, translation and scale (fitted to the 3-D
    landmarks the jaw does not move) applied at the depth of the hair's silhouette (`_rigid_head_motion`),
    r = 0.45 above the chin and 0.15 below it: when the head turns, the outline moves with the face's front while
    the hair round it turns about the head's centre, which a 2-D affine of the outline carries wrongly. Fitted on
    14 training clips (every 10th of their first 250 frames): prior warp SSIM 0.775 → 0.783, PSNR 22.99 → 23.47 dB;
    on the val clips (`benchmarks/renderer_ceiling.py`, every 4th frame) 0.763 → 0.771, 20.74 → 21.25 dB."""
    if head_motion not in HEAD_MOTIONS:
        raise ValueError(f"head_motion must be one of {HEAD_MOTIONS}, not {head_motion!r}.")
    out = mask.shape[0]
    centres = np.arange(out, dtype=np.float32)
    grid = np.stack(np.meshgrid(centres, centres), axis=-1)  # pixel (x, y) at the output resolution
    if head_motion == "rigid":
        head = _rigid_head_motion(source_landmarks, driving_landmarks, out / size, grid)
        rows = np.flatnonzero(mask.max(axis=1) > 0)
        chin = rows.max() if len(rows) else out
        head_reach = np.where(centres[:, None] > chin, 0.15, 0.45)
    else:
        head_reach = 0.2
        outline = _face_outline()
        normalised = (2 * grid + 1) / out - 1
        to_norm = lambda xy: (2 * np.asarray(xy, dtype=np.float64)[..., :2] + 1) / size - 1  # noqa: E731
        drv, src = to_norm(driving_landmarks)[outline], to_norm(source_landmarks)[outline]
        affine = np.linalg.lstsq(np.hstack([drv, np.ones((len(drv), 1))]), src, rcond=None)[0]  # [3, 2]
        head = normalised @ affine[:2] + affine[2] - normalised  # [h, w, 2] normalised
    # Near the mesh, stay continuous with its flow: spread the mesh's departure from the head motion outwards.
    sigma = spread * out
    weight = cv2.GaussianBlur(mask, (0, 0), sigma)
    departure = (
        np.stack([cv2.GaussianBlur((flow[c] - head[..., c]) * mask, (0, 0), sigma) for c in range(2)], axis=-1)
        / np.maximum(weight, 1e-6)[..., None]
    )
    head = head + departure * np.clip(weight / reach, 0, 1)[..., None]
    distance = cv2.distanceTransform((mask == 0).astype(np.uint8), cv2.DIST_L2, 5) / out
    head *= np.exp(-((distance / head_reach) ** 2))[..., None]

    person = cv2.resize(np.asarray(person_mask, dtype=np.float32), (out, out), interpolation=cv2.INTER_AREA)
    moved = (grid + head * out / 2).astype(np.float32)
    lands_on_person = cv2.remap(
        person, moved[..., 0], moved[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    outside = head * np.clip((lands_on_person - 0.2) / 0.6, 0, 1)[..., None]
    background = person < 0.5
    if background.any() and not background.all():
        _, nearest = cv2.distanceTransformWithLabels(
            (~background).astype(np.uint8), cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL
        )
        nearest_xy = np.argwhere(background)[nearest - 1][..., ::-1].astype(np.float32)  # labels count zero pixels
        uncovered = (lands_on_person < 0.5) & ~background
        outside = np.where(uncovered[..., None], (nearest_xy - grid) * 2 / out, outside)
    return np.where(mask[None] > 0, flow, outside.transpose(2, 0, 1)).astype(np.float32)


def _rigid_head_motion(
    source_landmarks: np.ndarray, driving_landmarks: np.ndarray, to_out: float, grid: np.ndarray, depth: float = 0.3
) -> np.ndarray:
    """Backward flow [h, w, 2] (normalised) of the head's 3-D similarity motion between two meshes [478, 3] (crop
    pixels; `to_out` scales them to `grid` [h, w, 2], the output's pixel centres) for points on the plane `depth`
    outline widths behind the driving face outline, where the hair's silhouette lies (0.3 fitted on training clips;
    the outline's own depth, 0, and 0.6 both carry the hair worse). The motion is fitted to the points that move
    with the skull alone (`_skull_points`): fitted to the whole outline, an opening jaw would move the hair too."""
    pixel_centres = np.array([0.5, 0.5, 0.0])
    source = (np.asarray(source_landmarks, dtype=np.float64)[:, :3] + pixel_centres) * to_out - pixel_centres
    driving = (np.asarray(driving_landmarks, dtype=np.float64)[:, :3] + pixel_centres) * to_out - pixel_centres
    skull = _skull_points(source)
    scale, rotation, translation = align(source[skull], driving[skull])
    outline = driving[_face_outline()]
    plane = outline[:, 2].mean() + depth * np.ptp(outline[:, 0])
    points = np.concatenate([grid, np.full(grid.shape[:2] + (1,), plane)], axis=-1)
    in_source = (points - translation) @ rotation / scale  # the inverse motion, on row vectors
    return ((in_source[..., :2] - grid) * 2 / grid.shape[0]).astype(np.float32)


def _skull_points(landmarks: np.ndarray) -> np.ndarray:
    """Indices of the mesh points that the jaw and the lips do not move: the face outline above the nose tip (1),
    the nose bridge and the eyes' corners."""
    outline = _face_outline()
    return np.concatenate([outline[landmarks[outline, 1] < landmarks[1, 1]], [6, 168, 197, 33, 133, 263, 362]])


@functools.cache
def _face_outline() -> np.ndarray:
    from mediapipe.python.solutions import face_mesh_connections as fmc

    return np.array(sorted({i for edge in fmc.FACEMESH_FACE_OVAL for i in edge}))


def prior_warp(source_image: np.ndarray, source_landmarks: np.ndarray, driving_landmarks: np.ndarray) -> np.ndarray:
    """The source image (uint8 [S, S, 3]) warped by `prior_flow` at its full resolution: the renderer's geometry
    without anything learned. Returns uint8 [S, S, 3]."""
    image = np.asarray(source_image)
    size = image.shape[0]
    flow, _ = prior_flow(source_landmarks, driving_landmarks, size)
    centres = np.arange(size, dtype=np.float32)
    grid_x, grid_y = np.meshgrid(centres, centres)
    # Normalised displacement → pixels (grid_sample with align_corners=False: 2 units span `size` pixels).
    map_x, map_y = grid_x + flow[0] * size / 2, grid_y + flow[1] * size / 2
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def moved_region(
    source_landmarks: np.ndarray, driving_landmarks: np.ndarray, size: int, min_shift: float = 0.5
) -> np.ndarray:
    """Weights float32 [size, size] in [0, 1]: 1 where `prior_flow` between the two meshes moves the image by at
    least `min_shift` pixels, grown by 1/32 of the side and feathered over 1/64 of it, 0 where the image stays
    put; for blending a changed face back into an image without touching the rest."""
    flow, _ = prior_flow(source_landmarks, driving_landmarks, size)
    moved = (np.hypot(flow[0], flow[1]) * size / 2 >= min_shift).astype(np.uint8)
    grow = max(1, round(size / 32))
    moved = cv2.dilate(moved, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * grow + 1,) * 2))
    return np.clip(cv2.GaussianBlur(moved.astype(np.float32), (0, 0), size / 64), 0, 1)


def warp_lock(
    driving_landmarks: np.ndarray, size: int, out_size: int | None = None, margin: float = 0.1
) -> np.ndarray:
    """Where the renderer's output is the warped portrait itself, float32 [h, w] in [0, 1] (h = `out_size` or
    `size`): the driving mesh's face oval grown by `margin` × the face size, less the mouth opening (inner lips),
    which the decoder draws (teeth, tongue, lips closing over a gap); edges feathered over 2/256 of the side.
    The warp follows the mesh there, while synthesised pixels on the face and along the jaw shift the expression
    that a face tracker reads (`FaceDecoder`'s `warp_lock_margin`)."""
    out_size = out_size or size
    points = _scaled_points(driving_landmarks, size, out_size)
    lock = _grown_hull(points, _face_outline(), out_size, margin)
    cv2.fillPoly(lock, [np.round(points[_mouth_ring()]).astype(np.int32)], 0.0)
    return cv2.GaussianBlur(lock, (0, 0), 2 * out_size / 256)


def lips_mask(landmarks: np.ndarray, size: int, out_size: int | None = None, grow: float = 0.05) -> np.ndarray:
    """float32 [h, w] (h = `out_size` or `size`): 1 on the lips of a mesh on a `size` crop (the hull of MediaPipe's
    lip points) grown by `grow` × the face size, 0 elsewhere."""
    out_size = out_size or size
    return _grown_hull(_scaled_points(landmarks, size, out_size), _region_indices()[1], out_size, grow)


def _scaled_points(landmarks: np.ndarray, size: int, out_size: int) -> np.ndarray:
    """A mesh's image points [N, 2] on a `size` crop moved onto an `out_size` one (pixel centres kept)."""
    return (np.asarray(landmarks, dtype=np.float32)[:, :2] + 0.5) * (out_size / size) - 0.5


def _grown_hull(points: np.ndarray, indices, out_size: int, grow: float) -> np.ndarray:
    """float32 [out_size, out_size]: 1 inside the convex hull of `points[indices]` and within `grow` × the face size
    (of all `points`) of its border, 0 elsewhere. Filling the hull and stroking its border with a thick pen is much
    cheaper than dilating it."""
    hull = cv2.convexHull(np.round(points[indices]).astype(np.int32))
    mask = np.zeros((out_size, out_size), np.float32)
    cv2.fillConvexPoly(mask, hull, 1.0)
    cv2.polylines(mask, [hull], True, 1.0, thickness=max(1, round(2 * grow * _face_size(points))))
    return mask


def _inter_ocular(landmarks: np.ndarray) -> np.ndarray:
    a, b = _EYE_OUTER_CORNERS
    return np.linalg.norm(landmarks[..., a, :2] - landmarks[..., b, :2], axis=-1)


def landmark_offsets(landmarks: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Motion of a mesh relative to a reference mesh of the same face, in units of the reference's inter-ocular
    distance, so it can move any other face: (landmarks − reference) / iod(reference). `landmarks` [..., 478, 3]
    (any leading axes), `reference` [478, 3]; float32."""
    reference = np.asarray(reference, dtype=np.float64)
    scale = max(float(_inter_ocular(reference)), 1e-6)
    return ((np.asarray(landmarks, dtype=np.float64) - reference) / scale).astype(np.float32)


def apply_landmark_offsets(reference: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The inverse of `landmark_offsets` for a (possibly other) face: reference + offsets · iod(reference)."""
    reference = np.asarray(reference, dtype=np.float64)
    return (reference + np.asarray(offsets, dtype=np.float64) * _inter_ocular(reference)).astype(np.float32)


def retarget_landmarks(
    portrait_landmarks: np.ndarray, driver_landmarks: np.ndarray, driver_reference: np.ndarray
) -> np.ndarray:
    """Move a portrait's mesh by the driver's motion relative to its reference frame, for cross-identity
    driving: portrait + (driver − reference) · iod(portrait) / iod(reference) (iod: inter-ocular distance,
    outer eye corners). `driver_landmarks` may be [478, 3] or [T, 478, 3]; returns the same shape, float32."""
    return apply_landmark_offsets(portrait_landmarks, landmark_offsets(driver_landmarks, driver_reference))
