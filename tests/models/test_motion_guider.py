import pytest
import torch

from pipeline_infp.models.motion_guider import ModulatedLinear
from tests.utils import randomize, tiny_model


def audio(guider, batch=2, frames=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, guider.config.audio_feature_dim, generator=generator)


def test_output_shapes():
    guider = tiny_model("motion_guider")
    with torch.no_grad():
        out = guider(audio(guider), audio(guider, seed=1))
    assert out.motion_features.shape == (2, 7, guider.config.hidden_dim)
    assert out.verbal.shape == out.non_verbal.shape == out.motion_features.shape


def test_own_voice_queries_the_verbal_bank_and_partner_voice_the_non_verbal_bank():
    guider = randomize(tiny_model("motion_guider"))
    own, partner = audio(guider), audio(guider, seed=1)
    with torch.no_grad():
        base = guider(own, partner)
        other_partner = guider(own, audio(guider, seed=2))
        other_own = guider(audio(guider, seed=3), partner)
    assert torch.allclose(base.verbal, other_partner.verbal)
    assert not torch.allclose(base.non_verbal, other_partner.non_verbal)
    assert torch.allclose(base.non_verbal, other_own.non_verbal)
    assert not torch.allclose(base.verbal, other_own.verbal)


def test_zero_style_equals_no_style_and_a_style_changes_the_features():
    guider = randomize(tiny_model("motion_guider"))
    own, partner = audio(guider), audio(guider, seed=1)
    with torch.no_grad():
        plain = guider(own, partner).motion_features
        zero = guider(own, partner, style=torch.zeros(guider.config.style_dim)).motion_features
        styled = guider(own, partner, style=torch.randn(guider.config.style_dim)).motion_features
    assert torch.allclose(plain, zero, atol=1e-6)
    assert (plain - styled).abs().mean() > 1e-4


def test_voice_activity_enters_the_queries():
    guider = randomize(tiny_model("motion_guider"))
    own, partner = audio(guider), audio(guider, seed=1)
    with torch.no_grad():
        silent = guider(own, partner, own_activity=torch.zeros(2, 7)).motion_features
        speaking = guider(own, partner, own_activity=torch.ones(2, 7)).motion_features
    assert not torch.allclose(silent, speaking)


def test_modulated_linear_demodulates_each_output_row():
    layer = ModulatedLinear(6, 3)
    with torch.no_grad():
        layer.affine.weight.normal_()
        identity = torch.eye(6)
        out = layer(identity, torch.randn(2, 3))  # rows of the modulated weight, transposed
    norms = out.pow(2).sum(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_style_encoder_takes_any_clip_length():
    guider = tiny_model("motion_guider")
    with torch.no_grad():
        short = guider.encode_style(torch.randn(3, guider.config.latent_dim))
        long = guider.encode_style(torch.randn(2, 40, guider.config.latent_dim))
    assert short.shape == (1, guider.config.style_dim) and long.shape == (2, guider.config.style_dim)


def test_style_presets_are_saved_with_the_config(tmp_path):
    guider = tiny_model("motion_guider")
    happy = [0.5] * guider.config.style_dim
    guider.register_to_config(style_presets={"happy": happy})
    guider.save_pretrained(tmp_path)
    loaded = type(guider).from_pretrained(tmp_path)
    assert loaded.style_preset_names == ["happy"]
    assert torch.allclose(loaded.style_preset("happy"), torch.tensor(happy))
    assert torch.all(loaded.style_preset("neutral") == 0)
    with pytest.raises(ValueError, match="Unknown style preset 'angry'.*happy"):
        loaded.style_preset("angry")


def test_style_reaches_the_features_directly_once_trained_and_the_encoder_sees_the_mean_expression():
    guider = tiny_model("motion_guider")
    own, partner = audio(guider), audio(guider, seed=1)
    style = torch.randn(guider.config.style_dim)
    with torch.no_grad():
        before = guider(own, partner, style=style).motion_features
        guider.style_to_features.weight.normal_()
        after = guider(own, partner, style=style).motion_features
        shift = guider.style_to_features(style)
        # The direct path adds one vector to every frame: nothing else changes.
        torch.testing.assert_close(after - before, shift.expand_as(before), atol=1e-5, rtol=1e-5)
        # A lasting expression (a constant offset to every reference frame) changes the style vector.
        reference = torch.randn(1, 20, guider.config.latent_dim)
        offset = torch.zeros(guider.config.latent_dim)
        offset[0] = 2.0
        assert (guider.encode_style(reference + offset) - guider.encode_style(reference)).abs().max() > 1e-3
