import torch

from pipeline_infp.presets import component_class, component_config


def tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A component of the pipeline built from its tiny preset (a motion encoder with a landmark basis fitted on
    random small mesh motions, so its latents move faces)."""
    torch.manual_seed(seed)
    model = component_class(name)(**component_config(name, "tiny")).eval()
    if name == "motion_encoder":
        model.fit_landmark_basis(torch.randn(32, model.config.num_landmarks, 3) * 0.05)
    return model


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter, so zero-initialised layers (adaLN-Zero gates, output heads) stop being
    identities and a test can see whether an input actually reaches the output."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


def tiny_random_pipeline():
    """The tiny pipeline with its motion model and flow estimator perturbed, so audio visibly moves the face."""
    from pipeline_infp import build_pipeline

    pipe = build_pipeline("tiny", seed=0)
    for name in ("motion_guider", "motion_transformer", "flow_estimator"):
        randomize(getattr(pipe, name), seed=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe
