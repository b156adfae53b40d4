"""WiSE-FT interpolation of a stage-2 fine-tune with its base: weights, what is kept from the base, refusals."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipeline_infp import INFPPipeline, build_pipeline
from tests.utils import randomize
from training.interpolate_motion import main


def save_pair(tmp_path, change=("motion_guider.verbal_attn", "motion_transformer")):
    """A tiny base folder (with an evaluation feature file) and a "fine-tune" of it with `change` perturbed."""
    base = build_pipeline("tiny", seed=0)
    base.save_pretrained(tmp_path / "base")
    np.savez(tmp_path / "base" / "motion_features.npz", reference=np.ones(3))
    tuned = build_pipeline("tiny", seed=0)
    for name in change:
        component, _, part = name.partition(".")
        randomize(getattr(tuned, component).get_submodule(part), seed=1, std=0.5)
    tuned.motion_guider.register_to_config(style_presets={"happy": [9.0] * tuned.motion_guider.config.style_dim})
    tuned.save_pretrained(tmp_path / "tuned")
    return base, tuned


def run(tmp_path, alpha, out="mix"):
    return main(["--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "tuned"), "--alpha", str(alpha),
                 "--output_dir", str(tmp_path / out)])  # fmt: skip


def test_motion_weights_lie_alpha_of_the_way_and_everything_else_is_the_base(tmp_path):
    base, tuned = save_pair(tmp_path)
    mixed = INFPPipeline.from_pretrained(run(tmp_path, 0.25))
    moved = 0
    for name in ("motion_guider", "motion_transformer"):
        start, end, got = (getattr(p, name).state_dict() for p in (base, tuned, mixed))
        for key in start:
            expected = start[key] + 0.25 * (end[key] - start[key])
            torch.testing.assert_close(got[key].float(), expected, atol=2e-3, rtol=1e-3, msg=key)  # fp16 folder
            moved += not torch.equal(start[key], end[key])
    assert moved > 10
    saved = load_file(tmp_path / "mix" / "motion_guider" / "diffusion_pytorch_model.safetensors")
    assert {value.dtype for value in saved.values()} == {torch.float16}
    for name in ("motion_encoder", "flow_estimator", "face_decoder", "appearance_encoder"):
        ours, theirs = getattr(mixed, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.allclose(ours[k].float(), theirs[k], atol=1e-3) for k in ours), name
    assert mixed.motion_guider.config.style_presets == base.motion_guider.config.style_presets  # not the tuned one
    assert (tmp_path / "mix" / "motion_features.npz").is_file()


def test_alpha_zero_and_one_give_the_two_models(tmp_path):
    base, tuned = save_pair(tmp_path)
    for alpha, expected in ((0, base), (1, tuned)):
        got = INFPPipeline.from_pretrained(run(tmp_path, alpha, out=f"mix{alpha}")).motion_transformer.state_dict()
        for key, value in expected.motion_transformer.state_dict().items():
            torch.testing.assert_close(got[key].float(), value.half().float(), atol=1e-3, rtol=1e-3, msg=key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("flow_estimator",), "different flow_estimator weights"),
        (("motion_guider.style_encoder",), "changed the style encoder"),
    ],
)
def test_refuses_folders_that_are_not_a_fine_tune_of_the_base(tmp_path, change, message):
    save_pair(tmp_path, change)
    with pytest.raises(ValueError, match=message):
        run(tmp_path, 0.5)
    assert not (tmp_path / "mix").exists()


def test_refuses_a_motion_model_of_another_architecture(tmp_path):
    save_pair(tmp_path)
    config_path = tmp_path / "tuned" / "motion_transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_heads"] = 1  # same weight shapes, another model
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="two motion_transformers have different configs"):
        run(tmp_path, 0.5)


def test_refuses_an_alpha_outside_the_segment_and_writing_over_an_input(tmp_path, capsys):
    save_pair(tmp_path)
    with pytest.raises(SystemExit):
        run(tmp_path, 1.5)
    assert "--alpha 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tmp_path, 0.5, out="base")
    assert "--output_dir must be a new folder" in capsys.readouterr().err
