"""INFPPipeline end to end with tiny random components on a real portrait crop."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler

from pipeline_infp import build_pipeline
from pipeline_infp.pipeline_infp import DRAWN_CLOSED_APERTURE, REST_PROBE_COMPONENTS
from pipeline_infp.processing import (
    OPEN_MOUTH_APERTURE,
    SAMPLE_RATE,
    AudioLoadError,
    AudioTooLongError,
    FaceProcessor,
    NoFaceDetectedError,
    SilentAudioError,
    mouth_aperture,
    moved_region,
    prior_flow,
    warp_lock,
)
from tests.utils import tiny_random_pipeline

IMAGE_SIZE = 64
STEPS = 3


@pytest.fixture(scope="module")
def face(shared_data):
    with FaceProcessor() as processor:
        return processor.crop_portrait(shared_data / "portraits" / "liveportrait-source-s1.jpg", size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline()


def speech(seconds: float, seed: int = 0, start: float = 0.0) -> np.ndarray:
    """A voiced, speech-like signal (harmonics with a syllable-rate envelope) of the given length."""
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    rng = np.random.default_rng(seed)
    voice = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) / (i + 1) for i, f in enumerate((140, 280, 420, 700)))
    envelope = (np.sin(2 * np.pi * 4 * t) > 0) * (t >= start)
    return (0.2 * voice * envelope).astype(np.float32)


def run(pipe, face, own, other=None, seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    return pipe(face, own, other, generator=torch.Generator().manual_seed(seed), image_size=IMAGE_SIZE, **kwargs)


def window(pipe) -> int:
    return pipe.motion_transformer.config.window_size


def test_frame_count_is_exact_for_odd_lengths(pipe, face):
    out = run(pipe, face, speech(1.37))  # 34.25 frames → 34, spread over four overlapping tiny windows
    assert out.frames.shape == (34, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert out.frames.dtype == np.float32 and 0 <= out.frames.min() and out.frames.max() <= 1
    assert out.motion_latents.shape == (34, pipe.motion_transformer.config.latent_dim)
    assert out.fps == 25.0
    assert out.audio.shape == (34 * SAMPLE_RATE // 25,)


def test_same_seed_same_video_other_seed_other_motion(pipe, face):
    a, b = run(pipe, face, speech(0.6)), run(pipe, face, speech(0.6))
    c = run(pipe, face, speech(0.6), seed=1)
    assert np.array_equal(a.frames, b.frames)
    assert not torch.allclose(a.motion_latents, c.motion_latents)


def test_output_types(pipe, face):
    own = speech(0.5)
    pil = run(pipe, face, own, output_type="pil")
    pt = run(pipe, face, own, output_type="pt")
    latent = run(pipe, face, own, output_type="latent")
    assert len(pil.frames) == 12 and isinstance(pil.frames[0], PIL.Image.Image)
    assert pil.frames[0].size == (IMAGE_SIZE, IMAGE_SIZE)
    assert pt.frames.shape == (12, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert latent.frames is None and torch.allclose(latent.motion_latents, pt.motion_latents)
    frames, motion, fps, audio = pipe(
        face, own, num_inference_steps=1, image_size=IMAGE_SIZE, output_type="latent", return_dict=False
    )
    assert frames is None and motion.shape[0] == 12 and fps == 25.0
    with pytest.raises(ValueError, match="output_type"):
        run(pipe, face, own, output_type="gif")


def branch_batch_sizes(pipe, face, **kwargs) -> set[int]:
    sizes = set()
    hook = pipe.motion_transformer.register_forward_hook(lambda module, args, out: sizes.add(args[0].shape[0]))
    try:
        run(pipe, face, speech(0.4), output_type="latent", **kwargs)
    finally:
        hook.remove()
    return sizes


def test_guidance_branches_are_batched_and_change_the_motion(pipe, face):
    assert branch_batch_sizes(pipe, face, guidance_scale=1.0) == {1}
    assert branch_batch_sizes(pipe, face, guidance_scale=2.5) == {2}
    style = torch.randn(pipe.motion_guider.config.style_dim)
    assert branch_batch_sizes(pipe, face, guidance_scale=2.5, style=style) == {3}
    plain = run(pipe, face, speech(0.4), guidance_scale=1.0, output_type="latent")
    guided = run(pipe, face, speech(0.4), guidance_scale=2.5, output_type="latent")
    assert not torch.allclose(plain.motion_latents, guided.motion_latents)


def test_previous_window_conditions_the_next(pipe, face):
    size = window(pipe)
    last_step_of_first_window = STEPS - 1

    def shift_first_window(pipeline, step, timestep, tensors):
        if step == last_step_of_first_window:
            return {"latents": tensors["latents"] + 1.0}
        return tensors

    own = speech(2 * size / 25)
    # Windows end to end: nothing but the condition frames carries the first window into the second.
    plain = run(pipe, face, own, output_type="latent", window_overlap=0)
    shifted = run(pipe, face, own, output_type="latent", window_overlap=0, callback_on_step_end=shift_first_window)
    first, second = slice(0, size), slice(size, 2 * size)
    # Same noise for the second window in both runs, so only the temporal condition can change it.
    assert not torch.allclose(plain.motion_latents[first], shifted.motion_latents[first])
    assert (plain.motion_latents[second] - shifted.motion_latents[second]).abs().mean() > 1e-4


def test_overlapping_windows_fade_from_one_into_the_next(pipe, face):
    size, steps_per_window = window(pipe), STEPS
    overlap = pipe.resolve_window_overlap(None)
    assert overlap == size // 5 > 0
    windows = []

    def keep_windows(pipeline, step, timestep, tensors):
        if step % steps_per_window == steps_per_window - 1:
            windows.append(pipeline.motion_transformer.denormalize_latents(tensors["latents"])[0])
        return tensors

    own = speech(2 * size / 25)
    out = run(pipe, face, own, output_type="latent", callback_on_step_end=keep_windows)
    stride = size - overlap
    assert len(windows) == pipe.num_windows(2 * size) == 3
    joined = out.motion_latents
    torch.testing.assert_close(joined[:stride], windows[0][:stride])
    torch.testing.assert_close(joined[size : size + stride - overlap], windows[1][overlap:stride])
    # Shared frames move from the first window's latents to the second's, a step of 1/(overlap + 1) at a time.
    shared = joined[stride:size]
    weights = torch.arange(1, overlap + 1).view(-1, 1) / (overlap + 1)
    torch.testing.assert_close(shared, (1 - weights) * windows[0][stride:] + weights * windows[1][:overlap])


def test_window_overlap_must_leave_the_condition_frames_in_the_finished_window(pipe, face):
    largest = window(pipe) - pipe.motion_transformer.config.num_prev_frames
    assert pipe.num_windows(100, largest) > pipe.num_windows(100, 0) == 9
    for bad in (-1, largest + 1, 2.5):
        with pytest.raises(ValueError, match=f"window_overlap must be a whole number of frames from 0 to {largest}"):
            run(pipe, face, speech(0.4), window_overlap=bad)


def test_style_changes_the_motion(pipe, face):
    guider = pipe.motion_guider
    own = speech(0.4)
    plain = run(pipe, face, own, output_type="latent")
    styled = run(pipe, face, own, style=torch.randn(guider.config.style_dim), output_type="latent")
    from_clip = run(pipe, face, own, style=torch.randn(30, guider.config.latent_dim), output_type="latent")
    assert not torch.allclose(plain.motion_latents, styled.motion_latents)
    assert not torch.allclose(plain.motion_latents, from_clip.motion_latents)
    neutral = run(pipe, face, own, style="neutral", style_guidance_scale=0.0, output_type="latent")
    assert torch.allclose(plain.motion_latents, neutral.motion_latents, atol=1e-5)
    with pytest.raises(ValueError, match="Unknown style preset"):
        run(pipe, face, own, style="ecstatic")
    with pytest.raises(ValueError, match="style vector must have"):
        run(pipe, face, own, style=torch.zeros(3))


def test_partner_track_changes_the_motion_and_missing_means_silence(pipe, face):
    own = speech(0.8)
    alone = run(pipe, face, own, output_type="latent")
    silent_partner = run(pipe, face, own, np.zeros_like(own), output_type="latent")
    talking_partner = run(pipe, face, own, speech(0.8, seed=3), output_type="latent")
    assert torch.allclose(alone.motion_latents, silent_partner.motion_latents)
    assert not torch.allclose(alone.motion_latents, talking_partner.motion_latents)


def test_listening_only_works_and_tracks_of_different_lengths_are_padded(pipe, face):
    out = run(pipe, face, np.zeros(SAMPLE_RATE // 2, np.float32), speech(1.0), output_type="latent")
    assert out.motion_latents.shape[0] == 25
    out = run(pipe, face, speech(1.0), speech(0.3), output_type="latent")
    assert out.motion_latents.shape[0] == 25


def test_bad_inputs_raise_clear_errors(pipe, face):
    with pytest.raises(SilentAudioError, match="Both audio tracks are silent"):
        run(pipe, face, np.zeros(SAMPLE_RATE, np.float32))
    with pytest.raises(AudioTooLongError, match="limit"):
        run(pipe, face, speech(2.0), max_duration=1.0)
    with pytest.raises(AudioLoadError):
        run(pipe, face, np.zeros(0, np.float32))
    with pytest.raises(NoFaceDetectedError, match="No face"):
        pipe(np.full((256, 256, 3), 127, np.uint8), speech(0.4), num_inference_steps=1)


def test_paste_back_returns_the_full_portrait(pipe, face):
    out = run(pipe, face, speech(0.2), paste_back=True)
    height, width = face.original.shape[:2]
    assert out.frames.shape == (5, height, width, 3)


def test_render_moves_the_portrait_by_the_mesh_its_latents_decode_to(face):
    pipe = build_pipeline("tiny", seed=0)
    encoder = pipe.motion_encoder
    # A basis that spans a sideways head shift, as one fitted on real motion does.
    shift = torch.zeros(1, encoder.config.num_landmarks, 3)
    shift[..., 0] = 0.1  # inter-ocular distances
    encoder.fit_landmark_basis(torch.cat([shift, torch.randn(8, *shift.shape[1:]) * 1e-3]))
    moved = face.landmarks.copy()
    iod = np.linalg.norm(face.landmarks[33, :2] - face.landmarks[263, :2])
    moved[:, 0] += 0.1 * iod
    portrait = pipe.encode_portrait(face)
    latents = pipe.encode_motion(face.image[None], moved[None], reference_landmarks=face.landmarks)
    assert torch.all(portrait.latent[:, : encoder.config.landmark_components] == 0)  # its own reference
    prior = pipe.prior_flows(portrait, pipe.motion_landmarks(face.landmarks, latents))
    working = pipe.appearance_encoder.config.sample_size
    assert prior.shape == (1, 2, working, working)
    # Inside the face every pixel samples the portrait 0.1 iod to its left (normalised: 2 px / crop side).
    centre = prior[0, 0, working // 2, working // 2].item()
    assert centre == pytest.approx(-2 * 0.1 * iod / IMAGE_SIZE, rel=0.05)
    frames = pipe.render(portrait, latents)
    assert frames.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE) and 0 <= frames.min() and frames.max() <= 1
    assert portrait.person_mask is None
    # A flow estimator trained on the person prior gets it: the portrait's person mask carries the head's motion.
    pipe.flow_estimator.register_to_config(person_prior=True)
    with_person = pipe.encode_portrait(face)
    assert with_person.person_mask.shape == (IMAGE_SIZE, IMAGE_SIZE)
    meshes = pipe.motion_landmarks(face.landmarks, latents)
    person_prior = pipe.prior_flows(with_person, meshes)
    expected = prior_flow(face.landmarks, meshes[0], IMAGE_SIZE, working, person_mask=with_person.person_mask)[0]
    torch.testing.assert_close(person_prior[0], torch.from_numpy(expected))
    assert person_prior[0, 0, working // 2, working // 2] == prior[0, 0, working // 2, working // 2]
    assert not torch.equal(person_prior, prior)
    # ... with the head's motion its config names.
    pipe.flow_estimator.register_to_config(head_motion="rigid")
    expected = prior_flow(
        face.landmarks, meshes[0], IMAGE_SIZE, working, person_mask=with_person.person_mask, head_motion="rigid"
    )[0]
    torch.testing.assert_close(pipe.prior_flows(with_person, meshes)[0], torch.from_numpy(expected))
    assert not torch.equal(pipe.prior_flows(with_person, meshes), person_prior)
    pipe.flow_estimator.register_to_config(head_motion="affine")
    # A face decoder with a warp lock gets the mask of each frame's mesh, and the face is the warped portrait there.
    assert pipe.warp_locks(portrait, meshes) is None
    pipe.face_decoder.register_to_config(warp_lock_margin=0.1)
    locks = pipe.warp_locks(portrait, meshes)
    torch.testing.assert_close(locks[0, 0], torch.from_numpy(warp_lock(meshes[0], IMAGE_SIZE, margin=0.1)))
    locked = pipe.render(portrait, latents)
    inside = locks.expand_as(frames) == 1
    unlocked = locks.expand_as(frames) == 0
    assert not torch.equal(locked[inside], frames[inside]) and torch.equal(locked[unlocked], frames[unlocked])
    assert torch.equal(pipe.render(portrait, latents, warp_lock=False), frames)  # the learned blend everywhere


@pytest.fixture(scope="module")
def open_face(shared_data):
    with FaceProcessor() as processor:
        return processor.crop_portrait(shared_data / "portraits" / "liveportrait-driving-d9.jpg", size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def jaw_pipe(open_face):
    """The tiny random pipeline with a motion basis that spans a jaw closing, as one fitted on real motion does."""
    pipe = tiny_random_pipeline()
    jaw = torch.zeros(1, 478, 3)
    jaw[0, torch.from_numpy(open_face.landmarks[:, 1] > open_face.landmarks[14, 1] - 1), 1] = -0.5
    pipe.motion_encoder.fit_landmark_basis(torch.cat([jaw, torch.randn(8, 478, 3) * 1e-3]))
    return pipe


@pytest.fixture(scope="module")
def rest_mesh(jaw_pipe, open_face):
    """`open_face`'s mesh with the lips closed by `rest_motion`, as the pipeline draws it at rest."""
    return jaw_pipe.motion_landmarks(open_face.landmarks, jaw_pipe.rest_motion(open_face.landmarks))[0]


def test_rest_motion_closes_the_mesh_of_parted_lips(jaw_pipe, open_face):
    rest = jaw_pipe.rest_motion(open_face.landmarks)
    geometry = jaw_pipe.motion_encoder.config.landmark_components
    assert rest.shape == (1, jaw_pipe.motion_encoder.config.latent_dim) and not rest[:, geometry:].any()
    at_rest = jaw_pipe.motion_landmarks(open_face.landmarks, rest)[0]
    assert mouth_aperture(at_rest) < 0.5 * mouth_aperture(open_face.landmarks)


def read_meshes(pipe, monkeypatch, *meshes):
    """MediaPipe reads these meshes, in turn, in the images it is given: the tiny random renderer draws no face."""
    queue = list(meshes)

    def landmarks(image):
        if not queue:
            raise NoFaceDetectedError("no face")
        return queue.pop(0)

    monkeypatch.setattr(pipe.face_processor, "landmarks", landmarks)


def drawn_at_rest(pipe, mesh) -> list:
    """MediaPipe's readings of every drawing the closing check makes (`rest_probes`), all of them `mesh`."""
    return [mesh] * (1 + 2 * min(REST_PROBE_COMPONENTS, pipe.motion_encoder.config.landmark_components))


def test_rest_probes_move_the_portrait_at_rest_along_its_first_principal_motions(jaw_pipe, open_face):
    encoding = jaw_pipe.encode_portrait(open_face)
    probes = jaw_pipe.rest_probes(encoding)
    count = min(REST_PROBE_COMPONENTS, jaw_pipe.motion_encoder.config.landmark_components)
    assert probes.shape == (1 + 2 * count, encoding.latent.shape[1]) and torch.equal(probes[0], encoding.latent[0])
    moves = probes[1:] - encoding.latent
    expected = torch.zeros_like(moves)
    for component in range(count):
        expected[2 * component, component], expected[2 * component + 1, component] = 1, -1
    torch.testing.assert_close(moves, expected)  # one spread each way, appearance values untouched


def test_drawn_rest_aperture_is_the_median_over_the_drawings_with_a_face(jaw_pipe, open_face, rest_mesh, monkeypatch):
    pipe = jaw_pipe
    encoding = pipe.encode_portrait(open_face)
    readings = [open_face.landmarks, rest_mesh, open_face.landmarks]  # then no face in the other drawings
    read_meshes(pipe, monkeypatch, *readings)
    assert pipe.drawn_rest_aperture(encoding) == pytest.approx(mouth_aperture(open_face.landmarks))
    read_meshes(pipe, monkeypatch, open_face.landmarks, rest_mesh, rest_mesh)
    assert pipe.drawn_rest_aperture(encoding) == pytest.approx(mouth_aperture(rest_mesh))
    read_meshes(pipe, monkeypatch)
    assert pipe.drawn_rest_aperture(encoding) is None


def test_close_portrait_mouth_goes_by_most_drawings_not_one(jaw_pipe, open_face, rest_mesh, monkeypatch):
    """One reading near the threshold moves with the slightest motion or renderer change: the median decides."""
    pipe = jaw_pipe
    drawings = len(drawn_at_rest(pipe, rest_mesh))
    mostly_closed = [open_face.landmarks] * (drawings // 2) + [rest_mesh] * (drawings - drawings // 2)
    read_meshes(pipe, monkeypatch, *mostly_closed)
    assert pipe.close_portrait_mouth(open_face) is open_face
    mostly_open = [rest_mesh] * (drawings // 2) + [open_face.landmarks] * (drawings - drawings // 2)
    read_meshes(pipe, monkeypatch, *mostly_open, rest_mesh)
    closed = pipe.close_portrait_mouth(open_face, max_passes=1)
    assert np.array_equal(closed.landmarks, rest_mesh) and not np.array_equal(closed.image, open_face.image)


def test_close_portrait_mouth_closes_what_the_renderer_leaves_open_and_nothing_else(
    jaw_pipe, open_face, rest_mesh, monkeypatch
):
    pipe = jaw_pipe
    assert mouth_aperture(open_face.landmarks) >= OPEN_MOUTH_APERTURE > mouth_aperture(rest_mesh)
    # The frame drawn at rest still shows the lips apart: the pass keeps it where the closing moves the face.
    read_meshes(pipe, monkeypatch, *drawn_at_rest(pipe, open_face.landmarks), rest_mesh)
    closed = pipe.close_portrait_mouth(open_face)
    untouched = moved_region(open_face.landmarks, rest_mesh, IMAGE_SIZE) == 0
    assert untouched.any() and not untouched.all()
    assert np.array_equal(closed.image[untouched], open_face.image[untouched])
    assert not np.array_equal(closed.image, open_face.image) and np.array_equal(closed.landmarks, rest_mesh)
    assert closed.matrix is open_face.matrix and closed.original is open_face.original  # pasted back as before
    read_meshes(pipe, monkeypatch, *drawn_at_rest(pipe, open_face.landmarks), rest_mesh)
    portrait = pipe.encode_portrait(open_face, close_mouth=True)  # animated from the closed image
    assert np.array_equal(portrait.landmarks, rest_mesh)
    assert np.array_equal(portrait.image, pipe.encode_portrait(closed).image)


def test_close_portrait_mouth_draws_the_lips_without_the_warp_lock(jaw_pipe, open_face, rest_mesh, monkeypatch):
    """The lock would keep the warped portrait's lips, into which the warp of a wide-open mouth carries its inside."""
    pipe = jaw_pipe
    read_meshes(pipe, monkeypatch, *drawn_at_rest(pipe, open_face.landmarks), rest_mesh)
    unlocked = pipe.close_portrait_mouth(open_face)
    encoding = pipe.encode_portrait(open_face)
    encoding.rest = pipe.rest_motion(encoding.landmarks)
    zero = torch.zeros_like(encoding.rest)
    pipe.face_decoder.register_to_config(warp_lock_margin=0.1)
    try:
        assert not torch.equal(pipe.render(encoding, zero), pipe.render(encoding, zero, warp_lock=False))
        read_meshes(pipe, monkeypatch, *drawn_at_rest(pipe, open_face.landmarks), rest_mesh)
        assert np.array_equal(pipe.close_portrait_mouth(open_face).image, unlocked.image)
    finally:
        pipe.face_decoder.register_to_config(warp_lock_margin=None)


def test_close_portrait_mouth_checks_the_lips_as_animated_and_closes_them_from_the_zero_latent(
    jaw_pipe, open_face, rest_mesh, monkeypatch
):
    """The check draws the portrait as the animation will (its own appearance values, at rest and under small
    motions); the pass from zero motion and zero appearance values, from which the renderer draws lips meeting."""
    pipe = jaw_pipe
    read_meshes(pipe, monkeypatch, *drawn_at_rest(pipe, open_face.landmarks), rest_mesh)
    drawn, render = [], pipe.render
    monkeypatch.setattr(
        pipe, "render", lambda portrait, latents, **kw: drawn.append(latents) or render(portrait, latents, **kw)
    )
    pipe.close_portrait_mouth(open_face, max_passes=1)
    own = pipe.encode_portrait(open_face).latent
    geometry = pipe.motion_encoder.config.landmark_components
    assert not own[:, :geometry].any() and own[:, geometry:].abs().sum() > 0  # at rest, with its own appearance
    assert len(drawn) == 2 and torch.equal(drawn[0], pipe.rest_probes(pipe.encode_portrait(open_face)))
    assert torch.equal(drawn[0][:1], own) and not drawn[1].any()


def lips_apart(closed: np.ndarray, open_: np.ndarray, gap: float) -> np.ndarray:
    """The mix of a closed and an open mesh whose inner-lip gap is `gap`."""
    low, high = 0.0, 1.0
    for _ in range(30):
        mix = (low + high) / 2
        low, high = (mix, high) if mouth_aperture(closed + mix * (open_ - closed)) < gap else (low, mix)
    return closed + low * (open_ - closed)


def test_close_portrait_mouth_closes_lips_drawn_only_just_under_open(jaw_pipe, open_face, rest_mesh, monkeypatch):
    """Lips drawn at rest a little apart open past the threshold at the slightest motion while listening."""
    pipe = jaw_pipe
    ajar = lips_apart(rest_mesh, open_face.landmarks, (DRAWN_CLOSED_APERTURE + OPEN_MOUTH_APERTURE) / 2)
    assert DRAWN_CLOSED_APERTURE < mouth_aperture(ajar) < OPEN_MOUTH_APERTURE
    read_meshes(pipe, monkeypatch, *drawn_at_rest(pipe, ajar), rest_mesh)
    closed = pipe.close_portrait_mouth(open_face)
    assert np.array_equal(closed.landmarks, rest_mesh) and not np.array_equal(closed.image, open_face.image)


def test_close_portrait_mouth_leaves_the_portrait_when_the_renderer_closes_it_or_loses_it(
    jaw_pipe, open_face, face, monkeypatch
):
    pipe = jaw_pipe
    assert mouth_aperture(face.landmarks) < OPEN_MOUTH_APERTURE and pipe.close_portrait_mouth(face) is face
    read_meshes(pipe, monkeypatch, *drawn_at_rest(pipe, face.landmarks))  # drawn at rest with the lips together
    assert pipe.close_portrait_mouth(open_face) is open_face
    read_meshes(pipe, monkeypatch)  # no face found: image and mesh stay together
    assert pipe.close_portrait_mouth(open_face) is open_face
    assert pipe.encode_portrait(open_face).rest is None  # reenactment: the portrait as it is


def test_close_mouth_renders_the_same_motion_from_closed_lips(jaw_pipe, open_face):
    pipe = jaw_pipe
    portrait = pipe.encode_portrait(open_face, close_mouth=True)
    assert portrait.rest.shape == portrait.latent.shape
    at_rest = pipe.motion_landmarks(portrait.landmarks, portrait.rest)[0]
    assert mouth_aperture(at_rest) < 0.5 * mouth_aperture(open_face.landmarks)

    # (Without silent_mouth_rest, which holds the lips at the rest mesh's own gap wherever the voice pauses.)
    closed, as_is = (
        run(pipe, open_face, speech(0.6), close_mouth=close, silent_mouth_rest=0.0) for close in (True, False)
    )
    # Nearly the same motion (the closed portrait's appearance conditions it a little), rendered from rest.
    torch.testing.assert_close(closed.motion_latents, as_is.motion_latents, atol=0.02, rtol=0)
    assert np.abs(closed.frames - as_is.frames).max() > 0.05


def test_silent_mouth_rest_holds_the_lips_at_rest_while_only_the_partner_speaks(jaw_pipe, open_face):
    pipe = jaw_pipe
    portrait = pipe.encode_portrait(open_face, close_mouth=True)
    at_rest = mouth_aperture(pipe.motion_landmarks(portrait.landmarks, portrait.rest))[0]
    own, partner = np.zeros(2 * SAMPLE_RATE, np.float32), speech(2.0, seed=2)

    def apertures(latents: torch.Tensor) -> np.ndarray:
        return mouth_aperture(pipe.motion_landmarks(portrait.landmarks, latents + portrait.rest))

    free, half, held = (
        apertures(run(pipe, open_face, own, partner, output_type="latent", silent_mouth_rest=s).motion_latents)
        for s in (0.0, 0.5, 1.0)
    )
    streamed = torch.cat([
        out.motion_latents
        for out in pipe.stream(open_face, [(own, partner)], num_inference_steps=STEPS, image_size=IMAGE_SIZE,
                               generator=torch.Generator().manual_seed(0))
    ])  # fmt: skip
    assert free.max() > at_rest + 0.1  # the random motion model opens the mouth while listening...
    assert held.max() < at_rest + 0.015 and apertures(streamed).max() < at_rest + 0.015  # ...unless held at rest
    assert held.mean() < half.mean() < free.mean()
    with pytest.raises(ValueError, match="silent_mouth_rest must be a number from 0"):
        run(pipe, open_face, own, partner, silent_mouth_rest=1.5)


def test_silent_mouth_weights_follow_the_agents_own_voice(pipe):
    activity = np.zeros(30, np.float32)
    activity[10:20] = 1
    weights = pipe.silent_mouth_weights(activity, 0.5)
    assert weights[:5].tolist() == [0.5] * 5 and not weights[10:20].any() and 0 < weights[8] < 0.5
    assert pipe.silent_mouth_weights(activity, 0) is None  # nothing to do: the generated motion as it is


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
def test_rested_mouth_applies_to_the_clean_estimate_whatever_the_model_predicts(jaw_pipe, open_face, prediction_type):
    pipe = jaw_pipe
    scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(scheduler.config, prediction_type=prediction_type, clip_sample=False)
    try:
        pipe.scheduler.set_timesteps(10)
        t = pipe.scheduler.timesteps[4]
        portrait = pipe.encode_portrait(open_face, close_mouth=True)
        generator = torch.Generator().manual_seed(0)
        latent_dim = pipe.motion_transformer.config.latent_dim
        latents, output = (torch.randn(1, 12, latent_dim, generator=generator) for _ in range(2))
        weights = np.linspace(0, 1, 12)

        def clean(model_output):
            return pipe.scheduler.step(model_output, t, latents).pred_original_sample

        adjusted = pipe.with_rested_mouth(portrait, output, latents, t, weights)
        torch.testing.assert_close(clean(adjusted), pipe.rest_mouth(portrait, clean(output), weights))
        assert not torch.allclose(clean(adjusted), clean(output))
    finally:
        pipe.scheduler = scheduler


def test_render_batches_and_threads_do_not_change_the_frames(pipe, face):
    portrait = pipe.encode_portrait(face)
    latents = run(pipe, face, speech(0.8), output_type="latent").motion_latents
    batched = pipe.render(portrait, latents, batch_size=16)
    # Other batch sizes reorder float sums only: far below one 8-bit grey level (1/255).
    torch.testing.assert_close(pipe.render(portrait, latents, batch_size=1), batched, atol=1e-4, rtol=0)
    meshes = pipe.motion_landmarks(face.landmarks, latents)
    with ThreadPoolExecutor(2) as pool:
        assert torch.equal(pipe.prior_flows(portrait, meshes, pool), pipe.prior_flows(portrait, meshes))


# Streaming: windows yielded as the audio arrives, continuous with each other, like __call__.


def chunks(own, partner=None, seconds: float = 0.3, log: list | None = None):
    size = round(seconds * SAMPLE_RATE)
    for start in range(0, len(own), size):
        if log is not None:
            log.append(start + size)
        yield own[start : start + size], None if partner is None else partner[start : start + size]


def stream_all(pipe, face, own, partner=None, seed=0, log=None, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return list(pipe.stream(face, chunks(own, partner, log=log), num_inference_steps=2, generator=generator,
                            image_size=IMAGE_SIZE, **kwargs))  # fmt: skip


@pytest.mark.parametrize(
    "overlap, lengths",
    [
        # 34 frames in windows of 12 end to end: two full windows while streaming, the rest when the audio ends.
        (0, [12, 12, 10]),
        # Windows of 12 every 10 frames: each yields the 10 frames the next one does not fade into; the last 4
        # frames come when the audio ends.
        (2, [10, 10, 10, 4]),
    ],
)
def test_windows_come_as_soon_as_their_audio_has_arrived(pipe, face, overlap, lengths):
    window = pipe.motion_transformer.config.window_size
    own, log, arrived = speech(1.37), [], []
    generator = torch.Generator().manual_seed(0)
    outputs = []
    for out in pipe.stream(face, chunks(own, log=log), num_inference_steps=2, generator=generator,
                           image_size=IMAGE_SIZE, window_overlap=overlap):  # fmt: skip
        arrived.append(log[-1])
        outputs.append(out)
    assert [len(o.frames) for o in outputs] == lengths
    assert [len(o.audio) for o in outputs] == [n * SAMPLE_RATE // 25 for n in lengths]
    assert outputs[0].frames.shape[1:] == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert arrived[0] < len(own)  # the first window did not wait for the whole track
    assert arrived[0] >= window / 25 * SAMPLE_RATE


def test_streamed_audio_is_the_mix_of_both_tracks_frame_for_frame(pipe, face):
    own, partner = speech(1.37), speech(1.37, seed=1)
    outputs = stream_all(pipe, face, own, partner)
    streamed = np.concatenate([o.audio for o in outputs])
    samples = 34 * SAMPLE_RATE // 25
    assert np.abs(own + partner).max() < 1  # no clipping, so the mix is the plain sum
    np.testing.assert_allclose(streamed, (own + partner)[:samples], atol=1e-6)


def test_one_window_streams_exactly_like_the_whole_call(pipe, face):
    own, partner = speech(0.4), speech(0.4, seed=1)
    streamed = stream_all(pipe, face, own, partner)
    whole = pipe(face, own, partner, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 image_size=IMAGE_SIZE, output_type="np")  # fmt: skip
    assert len(streamed) == 1
    np.testing.assert_allclose(streamed[0].frames, whole.frames, atol=1e-6)
    torch.testing.assert_close(streamed[0].motion_latents, whole.motion_latents)


def test_same_seed_same_stream_and_windows_continue_each_other(pipe, face):
    own = speech(1.37)
    first, second = stream_all(pipe, face, own), stream_all(pipe, face, own)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.frames, b.frames)
    latents = torch.cat([o.motion_latents for o in first])
    assert latents.shape == (34, pipe.motion_transformer.config.latent_dim)
    assert torch.isfinite(latents).all()


def test_a_missing_motion_model_is_a_clear_error(pipe, face):
    guider = pipe.motion_guider
    pipe.motion_guider = None
    try:
        with pytest.raises(ValueError, match="stage 2"):
            next(pipe.stream(face, chunks(speech(0.5))))
    finally:
        pipe.motion_guider = guider
