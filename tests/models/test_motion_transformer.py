import pytest
import torch

from tests.utils import randomize, tiny_model


@pytest.fixture
def transformer():
    return randomize(tiny_model("motion_transformer"))


def inputs(model, batch=2, seed=0):
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config.window_size, config.latent_dim, generator=generator)
    features = torch.randn(batch, config.window_size, config.motion_feature_dim, generator=generator)
    prev = torch.randn(batch, config.num_prev_frames, config.latent_dim, generator=generator)
    return sample, features, prev


def test_predicts_noise_of_the_sample_shape(transformer):
    sample, features, prev = inputs(transformer)
    with torch.no_grad():
        out = transformer(sample, torch.tensor([10, 500]), features, prev).sample
    assert out.shape == sample.shape


def test_zero_initialised_transformer_predicts_zero():
    model = tiny_model("motion_transformer")
    sample, features, prev = inputs(model)
    with torch.no_grad():
        assert torch.all(model(sample, 3, features, prev).sample == 0)


def test_dropped_inputs_equal_missing_inputs(transformer):
    sample, features, prev = inputs(transformer)
    drop = torch.tensor([True, False])
    with torch.no_grad():
        mixed = transformer(sample, 7, features, prev, drop_motion_features=drop, drop_prev_latents=drop).sample
        unconditional = transformer(sample[:1], 7, None, None).sample
        conditional = transformer(sample[1:], 7, features[1:], prev[1:]).sample
    assert torch.allclose(mixed[:1], unconditional, atol=1e-5)
    assert torch.allclose(mixed[1:], conditional, atol=1e-5)


def test_every_condition_reaches_the_output(transformer):
    sample, features, prev = inputs(transformer)
    _, other_features, other_prev = inputs(transformer, seed=1)
    with torch.no_grad():
        base = transformer(sample, 7, features, prev).sample
        assert not torch.allclose(base, transformer(sample, 7, other_features, prev).sample)
        assert not torch.allclose(base, transformer(sample, 7, features, other_prev).sample)
        assert not torch.allclose(base, transformer(sample, 600, features, prev).sample)


def test_shorter_windows_and_bad_lengths(transformer):
    sample, features, prev = inputs(transformer)
    with torch.no_grad():
        assert transformer(sample[:, :5], 1, features[:, :5], prev).sample.shape == (2, 5, sample.shape[-1])
    too_long = torch.cat([sample, sample], dim=1)
    with pytest.raises(ValueError, match="exceeds window_size"):
        transformer(too_long, 1)
    with pytest.raises(ValueError, match="prev_latents must hold"):
        transformer(sample, 1, features, prev[:, :2])


def test_latent_statistics_round_trip(transformer, tmp_path):
    transformer.latent_mean.fill_(0.5)
    transformer.latent_std.fill_(2.0)
    latents = torch.randn(1, 3, transformer.config.latent_dim)
    assert torch.allclose(transformer.denormalize_latents(transformer.normalize_latents(latents)), latents)
    transformer.save_pretrained(tmp_path)
    loaded = type(transformer).from_pretrained(tmp_path)
    assert torch.all(loaded.latent_mean == 0.5) and torch.all(loaded.latent_std == 2.0)
