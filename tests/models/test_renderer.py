"""Face renderer networks: motion encoder, appearance encoder, flow estimator, warping face decoder."""

import torch
import torch.nn.functional as F

from pipeline_infp.models.face_decoder import warp
from tests.utils import randomize, tiny_model


def offsets(encoder, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, encoder.config.num_landmarks, 3, generator=generator) * 0.05


def test_motion_encoder_gives_one_latent_per_image_at_any_input_size():
    encoder = tiny_model("motion_encoder")
    latent_dim = encoder.config.latent_dim
    with torch.no_grad():
        small = encoder(torch.rand(3, 3, 32, 32) * 2 - 1, offsets(encoder, 3))
        large = encoder(torch.rand(2, 3, 96, 96) * 2 - 1, offsets(encoder, 2))
    assert small.shape == (3, latent_dim) and large.shape == (2, latent_dim)
    assert not torch.allclose(small[0], small[1])


def test_motion_encoder_geometry_round_trips_motions_in_its_basis_and_no_motion_is_zero():
    encoder = tiny_model("motion_encoder")
    k = encoder.config.landmark_components
    hybrid = torch.rand(2, 3, 32, 32) * 2 - 1
    # Motions the basis spans (combinations of its rows) decode back exactly.
    spanned = (torch.randn(2, k) @ encoder.landmark_basis).reshape(2, -1, 3)
    with torch.no_grad():
        latents = encoder(hybrid, spanned)
        still = encoder(hybrid, torch.zeros_like(spanned))
    torch.testing.assert_close(encoder.decode_landmark_offsets(latents), spanned, atol=1e-5, rtol=1e-4)
    assert torch.all(still[:, :k] == 0)
    # The image part of the latent comes from the hybrid representation alone.
    torch.testing.assert_close(latents[:, k:], still[:, k:])


def test_fitted_landmark_basis_is_orthonormal_and_keeps_most_of_low_rank_motion():
    encoder = tiny_model("motion_encoder")
    k, n = encoder.config.landmark_components, encoder.config.num_landmarks
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(k, n * 3, generator=generator)
    samples = (torch.randn(200, k, generator=generator) @ directions).reshape(200, n, 3)
    kept = encoder.fit_landmark_basis(samples + 1e-3 * torch.randn(samples.shape, generator=generator))
    assert kept > 0.999
    basis = encoder.landmark_basis
    torch.testing.assert_close(basis @ basis.T, torch.eye(k), atol=1e-5, rtol=0)
    # Coefficients come out on a unit scale, whatever the motion's size.
    coefficients = encoder.encode_landmark_offsets(samples)
    assert 0.5 < coefficients.std().item() < 2.0


def test_appearance_encoder_works_at_its_sample_size_whatever_the_input_size():
    encoder = tiny_model("appearance_encoder")
    size = encoder.config.sample_size
    with torch.no_grad():
        features = encoder(torch.rand(2, 3, 4 * size, 4 * size))
    assert features.shape == (2, encoder.out_channels, size // 4, size // 4)


def test_flow_estimator_starts_as_the_prior_flow_with_everything_visible():
    estimator = tiny_model("flow_estimator")
    latent_dim, channels = estimator.config.latent_dim, estimator.config.feature_channels
    prior = torch.randn(4, 2, 64, 64) * 0.1  # at the output resolution, finer than the features
    with torch.no_grad():
        out = estimator(
            torch.randn(1, latent_dim), torch.randn(4, latent_dim), torch.randn(1, channels, 16, 16), prior
        )
    assert out.flow.shape == (4, 2, 64, 64) and out.occlusion.shape == (4, 1, 16, 16)
    assert torch.equal(out.flow, prior)
    assert torch.allclose(out.occlusion, torch.full_like(out.occlusion, torch.sigmoid(torch.tensor(3.0)).item()))


def test_flow_depends_on_the_driving_motion_and_the_prior():
    estimator = randomize(tiny_model("flow_estimator"))
    latent_dim, channels = estimator.config.latent_dim, estimator.config.feature_channels
    source, features, prior = torch.randn(1, latent_dim), torch.randn(1, channels, 16, 16), torch.zeros(1, 2, 32, 32)
    with torch.no_grad():
        a = estimator(source, torch.randn(1, latent_dim), features, prior).flow
        b = estimator(source, torch.randn(1, latent_dim), features, prior).flow
        # A prior changes the flow by more than itself: the correction sees it too.
        moved = estimator(source, torch.zeros(1, latent_dim), features, prior + 0.1).flow
        still = estimator(source, torch.zeros(1, latent_dim), features, prior).flow
    assert (a - b).abs().mean() > 1e-4
    assert ((moved - still) - 0.1).abs().mean() > 1e-4


def test_warp_with_zero_flow_is_exact_identity():
    features = torch.randn(2, 5, 12, 16)
    assert torch.allclose(warp(features, torch.zeros(2, 2, 12, 16)), features, atol=1e-5)


def test_warp_moves_content_by_the_flow():
    features = torch.zeros(1, 1, 16, 16)
    features[0, 0, 8, 4] = 1.0
    # Backward flow: each output pixel samples the source 3 pixels to its left (2 / 16 per pixel).
    flow = torch.zeros(1, 2, 16, 16)
    flow[:, 0] = -3 * 2 / 16
    moved = warp(features, flow)
    assert moved[0, 0].argmax().item() == 8 * 16 + 7


def test_warp_resizes_a_coarse_flow_to_the_features():
    features = torch.randn(1, 3, 32, 32)
    assert warp(features, torch.zeros(1, 2, 8, 8)).shape == features.shape


def decoder_inputs(decoder, flow_value=0.0, occlusion_value=1.0):
    channels = decoder.config.feature_channels
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, channels, 16, 16, generator=generator)
    image = torch.rand(1, 3, 128, 128, generator=generator) * 2 - 1
    return features, torch.full((1, 2, 16, 16), flow_value), torch.full((1, 1, 16, 16), occlusion_value), image


def test_face_decoder_output_has_the_source_image_resolution():
    decoder = tiny_model("face_decoder")
    with torch.no_grad():
        out = decoder(*decoder_inputs(decoder))
    assert out.sample.shape == out.warped.shape == (1, 3, 128, 128)
    assert out.blend.shape == (1, 1, 128, 128)


def test_face_decoder_starts_close_to_the_warped_source():
    decoder = tiny_model("face_decoder")
    features, flow, occlusion, image = decoder_inputs(decoder)
    with torch.no_grad():
        out = decoder(features, flow, occlusion, image)
    assert torch.allclose(out.warped, image, atol=1e-5)  # zero flow
    assert out.blend.mean() > 0.75  # mostly the (here unmoved) source from the first step


def test_face_decoder_uses_flow_and_occlusion():
    decoder = randomize(tiny_model("face_decoder"))
    with torch.no_grad():
        still = decoder(*decoder_inputs(decoder)).sample
        moved = decoder(*decoder_inputs(decoder, flow_value=0.25)).sample
        hidden = decoder(*decoder_inputs(decoder, occlusion_value=0.0)).sample
    assert F.l1_loss(still, moved) > 1e-3
    assert F.l1_loss(still, hidden) > 1e-3


def test_face_decoder_warp_lock_makes_the_output_the_warped_source_where_it_is_one():
    decoder = randomize(tiny_model("face_decoder"))
    features, flow, occlusion, image = decoder_inputs(decoder, flow_value=0.1)
    lock = torch.zeros(1, 1, 128, 128)
    lock[..., 32:96, 32:96] = 1
    with torch.no_grad():
        free = decoder(features, flow, occlusion, image)
        unlocked = decoder(features, flow, occlusion, image, torch.zeros_like(lock))
        locked = decoder(features, flow, occlusion, image, lock)
    assert torch.equal(unlocked.sample, free.sample)  # a zero lock leaves the learned blend alone
    inside = lock.expand_as(image) > 0
    assert torch.equal(locked.sample[inside], locked.warped[inside])
    assert torch.equal(locked.sample[~inside], free.sample[~inside])
    assert not torch.equal(free.sample[inside], free.warped[inside])
    assert torch.all(locked.blend[lock > 0] == 1)
