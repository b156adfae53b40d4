"""Portrait loading, face detection / 478-point landmarks (MediaPipe), cropping, INFP's hybrid
facial representation and pasting generated crops back into the original photo."""

from __future__ import annotations

import functools
import logging
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

from .errors import ImageLoadError, NoFaceDetectedError

logger = logging.getLogger(__name__)

ImageInput = str | Path | Image.Image | np.ndarray

MIN_SIDE = 32
MAX_MEGAPIXELS = 50.0
MAX_LONG_SIDE = 2048
# The mesh is run on a square crop resampled to this size: the mesh model itself works at
# 192 px, so more only costs time, and a fixed size makes small and huge faces behave alike.
_MESH_INPUT = 384
_TILE = 512  # fallback detection tile side, for faces too small in the full frame

NO_FACE_HINT = "use a photo where one face is clearly visible, frontal, at least ~64 px wide"

# Fixed mesh vertices (MediaPipe canonical face model) used by the aperture measures.
_EYE_OUTER_CORNERS = (33, 263)
_INNER_LIP_PAIRS = ((13, 14), (82, 87), (312, 317))  # upper / lower inner lip, centre and sides
CLOSED_MOUTH_APERTURE = 0.01  # MediaPipe's inner-lip gap of lips at rest, in inter-ocular distances
OPEN_MOUTH_APERTURE = 0.05  # an inner-lip gap this wide or wider reads as an open mouth (evaluation and pipeline)
_EYELID_PAIRS = ((159, 145), (158, 153), (160, 144), (386, 374), (385, 380), (387, 373))


# --------------------------------------------------------------------------- image loading


def _to_rgb(image: ImageInput) -> np.ndarray:
    """Any supported input as uint8 HxWx3 RGB, without resizing (coordinates stay valid)."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageLoadError(f"Portrait file not found: {path}. Check the path.")
        try:
            with Image.open(path) as pil:
                _check_size(pil.width, pil.height)  # before decoding, so huge files fail fast
                image = ImageOps.exif_transpose(pil)  # phone photos store rotation in EXIF
                image.load()
        except ImageLoadError:
            raise
        except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, bomb)
            raise ImageLoadError(
                f"Could not read the portrait {path} ({type(exc).__name__}: {exc}). Use a valid JPEG or PNG file."
            ) from exc
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            image = image.convert("RGBA")
        elif image.mode != "RGB":
            image = image.convert("RGB")
        image = np.asarray(image)
    if not isinstance(image, np.ndarray):
        raise ImageLoadError(
            f"Unsupported portrait type {type(image).__name__}: pass a file path, a PIL image or a numpy array."
        )
    arr = image
    if arr.size == 0:
        raise ImageLoadError("The portrait array is empty: pass an image with pixels in it.")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageLoadError(
            f"The portrait array has shape {image.shape}; expected HxW, HxWx1, HxWx3 or HxWx4 (channels last)."
        )
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageLoadError("The portrait array contains NaN or inf: pass finite values in [0, 1].")
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise ImageLoadError(f"The portrait array has dtype {arr.dtype}; pass uint8 (0-255) or float in [0, 1].")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:  # composite onto white: transparent backgrounds become neutral
        alpha = arr[..., 3:].astype(np.float32) / 255.0
        arr = np.round(arr[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _check_size(width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise ImageLoadError(
            f"The portrait is {width}x{height} px; it must be at least {MIN_SIDE} px on each side. Use a larger photo."
        )
    megapixels = width * height / 1e6
    if megapixels > MAX_MEGAPIXELS:
        raise ImageLoadError(
            f"The portrait is {width}x{height} px ({megapixels:.1f} megapixels), above the "
            f"{MAX_MEGAPIXELS:.0f} megapixel limit: resize it below {MAX_MEGAPIXELS:.0f} "
            f"megapixels (e.g. {MAX_LONG_SIDE} px on the long side) and try again."
        )


def load_image(image: ImageInput) -> np.ndarray:
    """Load a portrait as uint8 HxWx3 RGB, validating its size and capping the long side."""
    arr = _to_rgb(image)
    height, width = arr.shape[:2]
    _check_size(width, height)
    long_side = max(height, width)
    if long_side > MAX_LONG_SIDE:
        factor = MAX_LONG_SIDE / long_side
        new_size = (max(1, round(width * factor)), max(1, round(height * factor)))
        logger.info("Portrait is %dx%d px; downscaling to %dx%d.", width, height, *new_size)
        arr = cv2.resize(arr, new_size, interpolation=cv2.INTER_AREA)
    return arr


# --------------------------------------------------------------------------- crop geometry


def square_matrix(cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """Translation + uniform scale taking the square (centre, side) onto a size x size image."""
    s = size / side
    return np.array([[s, 0.0, size / 2 - s * cx], [0.0, s, size / 2 - s * cy]], dtype=np.float64)


def face_square(landmarks: np.ndarray, scale: float) -> tuple[float, float, float]:
    xy = landmarks[:, :2]
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    cx, cy = (lo + hi) / 2
    return float(cx), float(cy), float(scale * max(hi - lo))


def crop_matrix(landmarks: np.ndarray, size: int = 256, scale: float = 1.8) -> np.ndarray:
    """2x3 affine (image -> crop) of the upright square `scale` times the mesh bbox, centred on it.
    No rotation, so head roll remains part of the motion the model has to produce."""
    return square_matrix(*face_square(np.asarray(landmarks, dtype=np.float64), scale), size)


def apply_matrix(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Map [..., 2] or [..., 3] points through a 2x3 affine; z is scaled like x and y."""
    points = np.asarray(points, dtype=np.float64)
    out = points.copy()
    out[..., :2] = points[..., :2] @ matrix[:, :2].T + matrix[:, 2]
    if points.shape[-1] > 2:
        out[..., 2:] *= np.sqrt(abs(np.linalg.det(matrix[:, :2])))
    return out.astype(np.float32)


def crop_to_crop(from_matrix: np.ndarray, to_matrix: np.ndarray) -> np.ndarray:
    """2x3 affine from the pixels of one crop of a frame to those of another crop of it (both given as
    frame → crop matrices): to · from⁻¹."""
    square = lambda m: np.vstack([m, [0.0, 0.0, 1.0]])  # noqa: E731
    return (square(to_matrix) @ np.linalg.inv(square(from_matrix)))[:2]


def smoothed_crop_matrices(landmarks: list[np.ndarray], size: int, scale: float, window: int) -> np.ndarray:
    """Crop matrices [T, 2, 3] of a face track whose squares (centre, side) are averaged over `window` frames."""
    squares = moving_average(np.array([face_square(pts, scale) for pts in landmarks]), window)
    return np.stack([square_matrix(*square, size) for square in squares])


def warp_to_crop(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@dataclass
class FaceCrop:
    """A portrait's square face crop and how it maps back into the portrait."""

    image: np.ndarray  # uint8 [S, S, 3]
    landmarks: np.ndarray  # float32 [478, 3] in crop pixel coords
    matrix: np.ndarray  # 2x3 affine: original-image pixels -> crop pixels
    original: np.ndarray  # uint8 [H, W, 3] RGB image the crop came from


@dataclass
class FaceTrack:
    """Per-frame face crops of a clip (frames without a face left out)."""

    crops: np.ndarray  # uint8 [T', S, S, 3]
    landmarks: np.ndarray  # float32 [T', 478, 3] in crop pixel coords
    indices: np.ndarray  # int64 [T'] indices of the kept input frames
    dropped: int  # frames where no face was found
    matrices: np.ndarray  # float64 [T', 2, 3] frame pixels -> crop pixels


# --------------------------------------------------------------------------- detection / mesh


class FaceProcessor:
    """MediaPipe face detection (full range) + 478-point face mesh, and selfie segmentation for `person_mask`,
    created lazily and reused.

    MediaPipe graphs are stateful and not thread safe, so every call holds a lock.
    """

    def __init__(self, min_detection_confidence: float = 0.5):
        self.min_detection_confidence = min_detection_confidence
        self._detector: Any = None
        self._mesh: Any = None
        self._segmenter: Any = None
        self._lock = threading.Lock()

    def _graphs(self) -> tuple[Any, Any]:
        if self._detector is None:
            import mediapipe as mp  # heavy import, only paid when faces are processed

            self._detector = mp.solutions.face_detection.FaceDetection(
                model_selection=1, min_detection_confidence=self.min_detection_confidence
            )
            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=True,
                refine_landmarks=True,
                max_num_faces=1,
                min_detection_confidence=self.min_detection_confidence,
            )
        return self._detector, self._mesh

    def close(self) -> None:
        with self._lock:
            for graph in (self._detector, self._mesh, self._segmenter):
                if graph is not None:
                    graph.close()
            self._detector = self._mesh = self._segmenter = None

    def __enter__(self) -> FaceProcessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def person_mask(self, image: np.ndarray) -> np.ndarray:
        """How much each pixel of an RGB uint8 image [H, W, 3] belongs to a person (head, hair, body) rather than
        the background: float32 [H, W] in [0, 1], MediaPipe's selfie segmentation (its 256² general model)."""
        with self._lock:
            if self._segmenter is None:
                import mediapipe as mp

                self._segmenter = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
            mask = self._segmenter.process(np.ascontiguousarray(image)).segmentation_mask
        return np.clip(mask, 0, 1).astype(np.float32)

    def detect(self, image: ImageInput) -> list[np.ndarray]:
        """Face boxes [x0, y0, x1, y1, score] in pixels, largest first."""
        image = _to_rgb(image)
        boxes = self._detect_once(image)
        if not boxes and max(image.shape[:2]) > _TILE:
            # The detector letterboxes the whole frame to 192 px, so faces under ~5% of the long
            # side vanish (wide shots, tall phone photos): scan overlapping tiles instead.
            height, width = image.shape[:2]
            for y0 in _tile_starts(height):
                for x0 in _tile_starts(width):
                    for box in self._detect_once(image[y0 : y0 + _TILE, x0 : x0 + _TILE]):
                        box[:4] += (x0, y0, x0, y0)
                        boxes.append(box)
            boxes = _suppress_duplicates(boxes)
        return sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))

    def _detect_once(self, image: np.ndarray) -> list[np.ndarray]:
        height, width = image.shape[:2]
        with self._lock:
            result = self._graphs()[0].process(np.ascontiguousarray(image))
        boxes = []
        for det in result.detections or []:
            rel = det.location_data.relative_bounding_box
            x0, y0 = rel.xmin * width, rel.ymin * height
            boxes.append(
                np.array([x0, y0, x0 + rel.width * width, y0 + rel.height * height, det.score[0]], dtype=np.float32)
            )
        return boxes

    def _mesh_on(self, image: np.ndarray, cx: float, cy: float, side: float) -> np.ndarray | None:
        matrix = square_matrix(cx, cy, side, _MESH_INPUT)
        # Black (not replicated) border: replicated edge streaks can look like face parts.
        patch = cv2.warpAffine(image, matrix, (_MESH_INPUT, _MESH_INPUT), flags=cv2.INTER_LINEAR)
        with self._lock:
            result = self._graphs()[1].process(patch)
        if not result.multi_face_landmarks:
            return None
        pts = np.array([(p.x, p.y, p.z) for p in result.multi_face_landmarks[0].landmark], dtype=np.float64)
        pts *= _MESH_INPUT  # z is normalised by the input width, like x
        return apply_matrix(pts, cv2.invertAffineTransform(matrix))

    def landmarks(self, image: ImageInput, box: np.ndarray | None = None) -> np.ndarray:
        """478 mesh landmarks float32 [478, 3] (x, y, z) in pixels of `image` for the face in `box`
        (the largest detected face when None)."""
        image = _to_rgb(image)
        if box is not None:
            return self._first_mesh(image, [box], whole_image=False)
        return self._first_mesh(image, self.detect(image), whole_image=True)

    def _first_mesh(self, image: np.ndarray, boxes: list[np.ndarray], whole_image: bool) -> np.ndarray:
        """Mesh of the first box (largest first) that holds a face; a box can be a false positive."""
        for box in boxes:
            x0, y0, x1, y1 = (float(v) for v in box[:4])
            # The mesh's own detector is short-range: give it the face at ~half the input width.
            pts = self._mesh_on(image, (x0 + x1) / 2, (y0 + y1) / 2, 2.0 * max(x1 - x0, y1 - y0))
            if pts is not None:
                return pts
        if whole_image:  # full-range detection misses some tight close-ups the mesh handles
            height, width = image.shape[:2]
            pts = self._mesh_on(image, width / 2, height / 2, max(height, width))
            if pts is not None:
                return pts
        raise NoFaceDetectedError(f"No face landmarks found in the image: {NO_FACE_HINT}.")

    def crop_portrait(self, image: ImageInput, size: int = 256, scale: float = 1.8) -> FaceCrop:
        """Load a portrait, find its (largest) face and return the aligned square crop."""
        image = load_image(image)
        boxes = self.detect(image)
        if len(boxes) > 1:
            warnings.warn(f"Found {len(boxes)} faces in the portrait; using the largest", stacklevel=2)
        try:
            landmarks = self._first_mesh(image, boxes, whole_image=True)
        except NoFaceDetectedError:
            raise NoFaceDetectedError(f"No face found in the portrait: {NO_FACE_HINT}.") from None
        matrix = crop_matrix(landmarks, size, scale)
        return FaceCrop(warp_to_crop(image, matrix, size), apply_matrix(landmarks, matrix), matrix, image)

    def track_video(
        self, frames: np.ndarray, size: int = 256, scale: float = 1.8, smoothing: float = 0.5, fps: float = 25.0
    ) -> FaceTrack:
        """Crop the largest face of every frame with a temporally smoothed square.

        `smoothing` is the moving-average window in seconds applied to the crop centre and side:
        the crop stays steady while the head still visibly moves inside it. Frames without a
        face are dropped and counted.
        """
        kept, landmarks, count = self.track_landmarks(frames)
        if not kept:
            raise NoFaceDetectedError(f"No face found in any of the {count} video frames: {NO_FACE_HINT}.")
        matrices = smoothed_crop_matrices(landmarks, size, scale, max(1, round(smoothing * fps)))
        crops = np.stack([warp_to_crop(frames[i], m, size) for i, m in zip(kept, matrices)])
        crop_landmarks = np.stack([apply_matrix(pts, m) for pts, m in zip(landmarks, matrices)])
        return FaceTrack(crops, crop_landmarks, np.array(kept, dtype=np.int64), count - len(kept), matrices)

    def track_landmarks(self, frames: Iterable[np.ndarray]) -> tuple[list[int], list[np.ndarray], int]:
        """Mesh landmarks of the largest face of each frame of any iterable (a stream is read once): the
        indices of the frames with a face, their landmarks, and the number of frames seen."""
        kept, landmarks, count = [], [], 0
        for i, frame in enumerate(frames):
            count += 1
            try:
                landmarks.append(self.landmarks(frame))
            except NoFaceDetectedError:
                continue
            kept.append(i)
        return kept, landmarks, count


def _tile_starts(length: int) -> list[int]:
    stride = _TILE * 3 // 4  # overlap so a face on a tile border is whole in a neighbour
    starts = list(range(0, max(length - _TILE, 0) + 1, stride))
    if starts[-1] + _TILE < length:
        starts.append(length - _TILE)
    return starts


def _suppress_duplicates(boxes: list[np.ndarray], max_iou: float = 0.3) -> list[np.ndarray]:
    """Greedy non-maximum suppression: overlapping tiles report the same face twice."""
    kept: list[np.ndarray] = []
    for box in sorted(boxes, key=lambda b: -b[4]):
        if all(_iou(box, other) <= max_iou for other in kept):
            kept.append(box)
    return kept


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average along axis 0 with edge padding (no lag, no shrinking at the ends)."""
    window |= 1  # odd, so the average is centred
    if window == 1 or len(values) < 2:
        return values
    half = window // 2
    padded = np.pad(values, [(half, half)] + [(0, 0)] * (values.ndim - 1), mode="edge")
    kernel = np.ones(window) / window
    return np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(values.shape[1])], axis=1)


# --------------------------------------------------------------------------- hybrid representation


def _ordered_cycle(edges: frozenset) -> list[int]:
    """Walk a closed contour given as an unordered set of edges."""
    neighbours: dict[int, list[int]] = {}
    for a, b in edges:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    start = min(neighbours)
    order, prev = [start], None
    while True:
        nxt = next(n for n in neighbours[order[-1]] if n != prev)
        if nxt == start:
            return order
        prev = order[-1]
        order.append(nxt)


@functools.cache
def _region_indices() -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Landmark index sets from MediaPipe's own topology (eye regions, lips, ordered oval) and
    one colour per oval point. Cached: MediaPipe is imported on first use only."""
    from mediapipe.python.solutions import face_mesh_connections as fmc

    def points(*sets: frozenset) -> np.ndarray:
        return np.array(sorted({i for s in sets for edge in s for i in edge}))

    eyes = [
        points(fmc.FACEMESH_LEFT_EYE, fmc.FACEMESH_LEFT_IRIS, fmc.FACEMESH_LEFT_EYEBROW),
        points(fmc.FACEMESH_RIGHT_EYE, fmc.FACEMESH_RIGHT_IRIS, fmc.FACEMESH_RIGHT_EYEBROW),
    ]
    oval = np.array(_ordered_cycle(fmc.FACEMESH_FACE_OVAL))
    # Hue runs once round the oval, so the outline encodes which way the face is turned/rolled.
    hsv = np.stack(
        [np.linspace(0, 180, len(oval), endpoint=False), np.full(len(oval), 255), np.full(len(oval), 255)], axis=1
    ).astype(np.uint8)[None]
    colours = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]
    return eyes, points(fmc.FACEMESH_LIPS), oval, colours


def _face_size(landmarks: np.ndarray) -> float:
    xy = landmarks[:, :2]
    return float(max(xy.max(axis=0) - xy.min(axis=0)))


def hybrid_representation(image: np.ndarray, landmarks: np.ndarray, outline_radius: int | None = None) -> np.ndarray:
    """INFP's hybrid facial representation: the eye (with brows and iris) and lip pixels of
    `image` on black, plus the face oval as small circles coloured by their position on it."""
    eyes, lips, oval, colours = _region_indices()
    landmarks = np.asarray(landmarks, dtype=np.float32)
    face = _face_size(landmarks)
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    # Dilating a convex region = filling it and stroking its border with a thick pen; that is
    # much cheaper than cv2.dilate with a large kernel.
    for indices, grow in ((eyes[0], 0.03), (eyes[1], 0.03), (lips, 0.015)):
        hull = cv2.convexHull(np.round(landmarks[indices, :2]).astype(np.int32))
        cv2.fillConvexPoly(mask, hull, 255)
        cv2.polylines(mask, [hull], True, 255, thickness=max(1, round(2 * grow * face)))
    # C order whatever the input's strides (a channel-first tensor's view): OpenCV draws only into contiguous arrays.
    out = np.ascontiguousarray(np.where(mask[..., None] > 0, image, 0), dtype=np.uint8)
    radius = outline_radius if outline_radius is not None else max(1, round(0.012 * face))
    for (x, y), colour in zip(np.round(landmarks[oval, :2]).astype(int), colours):
        cv2.circle(out, (int(x), int(y)), radius, colour.tolist(), thickness=-1, lineType=cv2.LINE_AA)
    return out


# --------------------------------------------------------------------------- paste back


def paste_back(frames: np.ndarray, crop: FaceCrop, feather: float = 0.1) -> np.ndarray:
    """Warp generated crops (uint8 [T, S, S, 3] or [S, S, 3], any S) back into `crop.original`,
    blending with a Gaussian-feathered mask so no seam shows."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    original = crop.original
    height, width = original.shape[:2]
    size = frames.shape[1]
    matrix = crop.matrix * (size / crop.image.shape[0])  # generated at another resolution
    inverse = cv2.invertAffineTransform(matrix)

    # Only the crop's footprint in the original changes: warp into that box, not the full frame.
    corners = apply_matrix(np.array([[0, 0], [size, 0], [0, size], [size, size]], float), inverse)
    x0, y0 = np.clip(np.floor(corners.min(axis=0)).astype(int), 0, [width, height])
    x1, y1 = np.clip(np.ceil(corners.max(axis=0)).astype(int), 0, [width, height])
    if x1 <= x0 or y1 <= y0:
        return np.repeat(original[None], len(frames), axis=0)
    roi_inverse = inverse.copy()
    roi_inverse[:, 2] -= (x0, y0)
    roi_size = (int(x1 - x0), int(y1 - y0))

    border = max(1, round(feather * size / 2))
    mask = np.zeros((size, size), dtype=np.float32)
    mask[border:-border, border:-border] = 1.0
    mask = cv2.GaussianBlur(mask, (0, 0), sigmaX=border / 2)
    mask = cv2.warpAffine(mask, roi_inverse, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)[
        ..., None
    ]

    out = np.repeat(original[None], len(frames), axis=0)
    background = original[y0:y1, x0:x1].astype(np.float32)
    for t, frame in enumerate(frames):
        warped = cv2.warpAffine(
            frame, roi_inverse, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        ).astype(np.float32)
        out[t, y0:y1, x0:x1] = np.round(warped * mask + background * (1 - mask)).astype(np.uint8)
    return out


# --------------------------------------------------------------------------- measures


def _pair_distance(landmarks: np.ndarray, pairs: tuple[tuple[int, int], ...]) -> np.ndarray:
    a, b = np.array(pairs).T
    return np.linalg.norm(landmarks[..., a, :2] - landmarks[..., b, :2], axis=-1).mean(axis=-1)


def mouth_aperture(landmarks: np.ndarray) -> float | np.ndarray:
    """Inner-lip gap / inter-ocular distance ([478, 3] -> float, [..., 478, 3] -> [...])."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    result = _pair_distance(landmarks, _INNER_LIP_PAIRS) / _pair_distance(landmarks, (_EYE_OUTER_CORNERS,))
    return float(result) if result.ndim == 0 else result


def mouth_closing_motion(
    landmarks: np.ndarray, basis: np.ndarray, target: float | np.ndarray = CLOSED_MOUTH_APERTURE
) -> np.ndarray:
    """The smallest coefficients [..., K] over `basis` [K, 478 * 3] (landmark offsets in inter-ocular distances per
    unit coefficient, `processing.landmark_offsets`) that bring each mesh's ([..., 478, 3]) inner-lip gap down to
    `target` inter-ocular distances; zeros where the lips already meet. With a basis scaled to the spread of real
    facial motion this is the most ordinary motion that closes these lips (jaw and lips together), not a pinch of
    the inner lip line.

    The gap is measured along the face's downward axis (perpendicular to the eye line), signed: it is linear in the
    coefficients (exactly so for motions that keep the eyes still), so one step lands on or near the target, and
    lips pushed past each other (a negative gap, which generated
    motion can produce and real lips cannot) are brought back to meet (to -target) instead of being "closed"
    from the wrong side, which is what `mouth_aperture`'s unsigned distance would ask for."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    basis = np.asarray(basis, dtype=np.float64).reshape(len(basis), -1, 3)
    eye_line = landmarks[..., _EYE_OUTER_CORNERS[1], :2] - landmarks[..., _EYE_OUTER_CORNERS[0], :2]
    inter_ocular = np.linalg.norm(eye_line, axis=-1)
    down = np.stack([-eye_line[..., 1], eye_line[..., 0]], axis=-1) / np.maximum(inter_ocular, 1e-9)[..., None]
    upper, lower = np.array(_INNER_LIP_PAIRS).T
    gap = np.einsum("...pd,...d->...", landmarks[..., lower, :2] - landmarks[..., upper, :2], down) / len(upper)
    gap = gap / np.maximum(inter_ocular, 1e-9)
    target = np.asarray(target, dtype=np.float64)
    change = np.clip(gap, -target, target) - gap  # MediaPipe puts meeting lips a little past each other at times
    gradient = np.einsum("kpd,...d->...k", basis[:, lower, :2] - basis[:, upper, :2], down) / len(upper)
    step = change / np.maximum(np.einsum("...k,...k->...", gradient, gradient), 1e-12)
    return gradient * np.asarray(step)[..., None]


def eye_aperture(landmarks: np.ndarray) -> float | np.ndarray:
    """Mean upper-to-lower eyelid gap of both eyes / inter-ocular distance."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    result = _pair_distance(landmarks, _EYELID_PAIRS) / _pair_distance(landmarks, (_EYE_OUTER_CORNERS,))
    return float(result) if result.ndim == 0 else result
