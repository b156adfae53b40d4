import sys

import torch

from pipeline_infp import models
from pipeline_infp.pipeline_infp import COMPONENT_CLASSES


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A component of the pipeline built from its tiny preset."""
    model_class = getattr(models, COMPONENT_CLASSES[name])
    torch.manual_seed(seed)
    return model_class(**sys.modules[model_class.__module__].tiny_config()).eval()


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter, so zero-initialised layers (adaLN-Zero gates, output heads) stop being
    identities and a test can see whether an input actually reaches the output."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * std)
    return model
