"""WiSE-FT interpolation of a stage-1 fine-tune with its base: weights, configs, what is kept, refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline_infp import INFPPipeline, build_pipeline
from tests.utils import randomize
from training.interpolate_renderer import RENDERER, WEIGHTS, main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interpolate-renderer")
    pipe = build_pipeline("tiny", seed=0)
    pipe.save_pretrained(tmp / "base")
    for name in RENDERER:
        randomize(getattr(pipe, name), seed=2)
    pipe.flow_estimator.register_to_config(person_prior=True)
    pipe.save_pretrained(tmp / "tuned")
    return tmp


def run(folders, alpha, out, *extra):
    return main(["--base", str(folders / "base"), "--finetuned", str(folders / "tuned"), "--alpha", str(alpha),
                 "--output_dir", str(out), *extra])  # fmt: skip


def test_the_renderer_is_interpolated_and_the_rest_of_the_base_kept(folders):
    out = run(folders, 0.25, folders / "mix", "--warp_lock_margin", "0.1")
    for name in RENDERER:
        base, tuned, mixed = (load_file(f / name / WEIGHTS) for f in (folders / "base", folders / "tuned", out))
        assert any(not torch.equal(base[k], tuned[k]) for k in base)
        for key, value in mixed.items():
            assert value.dtype == base[key].dtype
            torch.testing.assert_close(value, base[key] + 0.25 * (tuned[key] - base[key]))
    assert json.loads((out / "flow_estimator" / "config.json").read_text())["person_prior"] is True
    assert json.loads((out / "face_decoder" / "config.json").read_text())["warp_lock_margin"] == 0.1
    for name in ("motion_guider", "motion_transformer"):
        assert (out / name / WEIGHTS).read_bytes() == (folders / "base" / name / WEIGHTS).read_bytes()
    pipe = INFPPipeline.from_pretrained(out)  # a pipeline folder like any other
    assert pipe.face_decoder.config.warp_lock_margin == 0.1 and pipe.flow_estimator.config.person_prior


def test_alpha_zero_and_one_give_the_two_renderers(folders):
    for alpha, source in ((0, "base"), (1, "tuned")):
        out = run(folders, alpha, folders / f"mix{alpha}")
        for name in RENDERER:
            expected, got = load_file(folders / source / name / WEIGHTS), load_file(out / name / WEIGHTS)
            assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_component_can_move_by_its_own_alpha(folders):
    out = run(folders, 0.5, folders / "per-component", "--component_alpha", "appearance_encoder=1", "face_decoder=0")
    expected = {"motion_encoder": 0.5, "appearance_encoder": 1.0, "flow_estimator": 0.5, "face_decoder": 0.0}
    for name, alpha in expected.items():
        base, tuned, mixed = (load_file(f / name / WEIGHTS) for f in (folders / "base", folders / "tuned", out))
        for key, value in mixed.items():
            torch.testing.assert_close(value, base[key] + alpha * (tuned[key] - base[key]))


def test_other_architectures_and_bad_arguments_are_refused(folders, tmp_path, capsys):
    other = build_pipeline("tiny", seed=0)
    config = {k: v for k, v in other.face_decoder.config.items() if not k.startswith("_")}
    other.register_modules(face_decoder=type(other.face_decoder)(**{**config, "num_mid_blocks": 2}))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="different layers"):
        main(["--base", str(folders / "base"), "--finetuned", str(tmp_path / "other"), "--alpha", "0.5",
              "--output_dir", str(tmp_path / "out")])  # fmt: skip
    for args, message in (
        (["--alpha", "1.5"], "choose a value from 0"),
        (["--output_dir", str(folders / "base")], "must be a new folder"),
        (["--finetuned", str(tmp_path / "nowhere")], "no motion_encoder"),
        (["--component_alpha", "decoder=1"], "name one of motion_encoder"),
        (["--component_alpha", "flow_estimator=half"], "must be a number"),
        (["--component_alpha", "flow_estimator=2"], "choose a value from 0"),
    ):
        defaults = {"--base": str(folders / "base"), "--finetuned": str(folders / "tuned"), "--alpha": "0.5",
                    "--output_dir": str(tmp_path / "out")}  # fmt: skip
        defaults.update(dict(zip(args[::2], args[1::2])))
        with pytest.raises(SystemExit):
            main([item for pair in defaults.items() for item in pair])
        assert message in capsys.readouterr().err
