"""Every component keeps its config and weights through save_pretrained → from_pretrained."""

import json

import pytest
import torch

from pipeline_infp.pipeline_infp import COMPONENT_CLASSES
from tests.utils import randomize, tiny_model


def public_config(config) -> dict:
    """Config values as stored in config.json (tuples become lists), without diffusers' private keys."""
    return json.loads(json.dumps({key: value for key, value in config.items() if not key.startswith("_")}))


@pytest.mark.parametrize("name", sorted(COMPONENT_CLASSES))
def test_round_trip_keeps_config_and_weights(name, tmp_path):
    model = randomize(tiny_model(name))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = type(model).from_pretrained(tmp_path)
    assert public_config(loaded.config) == public_config(model.config)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
