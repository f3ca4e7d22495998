"""The model card (``README.md``) of a model bundle: Hugging Face front matter, then what the model is, where
its base weights come from, what it was trained on and how well it does (see :mod:`lavis_medblip.models.bundle`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import torch
import yaml

from lavis_medblip.models.calibration import Calibration

TAGS = ["lavis-medblip", "medblip", "medical-imaging", "brain-mri", "3d", "alzheimers-disease", "safetensors"]
#: What the YAML URLs of the paper's base weights are, for the card.
KNOWN_SOURCES = {
    "eva_vit_g.pth": "EVA-CLIP ViT-g/14 (LAVIS's copy, BLIP-2's image encoder)",
    "blip2_pretrained.pth": "BLIP-2 stage-1 Q-Former (LAVIS's blip2_pretrained.pth)",
}
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")


def source(value: Any, none: str) -> str:
    """``value`` in backticks with what it is when known, or ``none`` when unset."""
    if not value:
        return none
    if str(value).startswith("${medblip_"):  # bundle.portable_paths: found where lavis-medblip is installed
        kind = "packaged with lavis-medblip" if "asset" in str(value) else "scripts/bootstrap.sh's local folder"
        return f"`{value}` ({kind})"
    known = next((what for name, what in KNOWN_SOURCES.items() if str(value).endswith(name)), None)
    return f"`{value}`" + (f" — {known}" if known else "")


def base_weights(model: Mapping[str, Any]) -> list[str]:
    """One line per part: the config key that names its weights, and where they come from."""
    vision, qformer, lm = model["vision"], model["qformer"], model["lm"]
    seed = f"random, from `init_seed: {model['init_seed']}`"
    bert = f"`{qformer['bert']}`" + ("" if qformer["load_bert_weights"] else " (its architecture and vocabulary only; "
                                     "weights random)")
    if lm.get("config_overrides"):
        language_model = f"random {lm['config_overrides'].get('model_type')} LM of `lm.config_overrides` ({seed})"
    else:
        language_model = source(lm.get("model"), "not set")
    return [
        f"| 2D ViT blocks ({vision['model']}) | `vision.weights` | {source(vision.get('weights'), seed)} |",
        f"| Q-Former init | `qformer_pretrained` | {source(model.get('qformer_pretrained'), 'none')} |",
        f"| Q-Former BERT | `qformer.bert` | {bert} |",
        f"| language model | `lm.model` | {language_model}; tokenizer `{lm.get('tokenizer') or lm.get('model')}` |",
        f"| 3D patch stem, queries, projections | — | {seed}, then trained (in `model.safetensors`) |",
    ]


def front_matter(model: Mapping[str, Any], license: str) -> str:
    meta: dict[str, Any] = {"library_name": "lavis-medblip", "license": license,
                            "tags": TAGS + ([model["model_type"]] if model.get("model_type") else [])}
    lm_name = model["lm"].get("model")
    if isinstance(lm_name, str) and HUB_NAME.fullmatch(lm_name):
        meta["base_model"] = lm_name
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def trained_summary(state: Mapping[str, torch.Tensor]) -> str:
    parts: dict[str, int] = {}
    for name, tensor in state.items():
        parts[name.split(".")[0]] = parts.get(name.split(".")[0], 0) + tensor.numel()
    listed = ", ".join(f"`{part}` {count:,}" for part, count in parts.items())
    return f"{len(state)} tensors, {sum(parts.values()):,} parameters ({listed})"


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"test": {"auroc": 0.7}}`` → ``{"test/auroc": 0.7}``; lists (e.g. reliability bins) are left out."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            flat.update(flat_metrics(value, f"{prefix}{key}/"))
        elif not isinstance(value, list):
            flat[f"{prefix}{key}"] = value
    return flat


def model_card(config: Mapping[str, Any], state: Mapping[str, torch.Tensor], calibration: Calibration,
               metrics: Mapping[str, Any] | None, training_data: str | None, license: str) -> str:
    model = config["model"]
    name = f"MedBLIP ({model['model_type']})" if model.get("model_type") else "MedBLIP"
    metric_rows = [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                   for key, value in flat_metrics(metrics or {}).items()]
    lines = [
        front_matter(model, license),
        f"# {name}",
        "",
        "MedBLIP (Chen & Hong, ACCV 2024) for 3D brain MRI and EHR text: it ranks the diagnoses NC / MCI / AD "
        "(`predict_answers`) and answers free-text questions (`generate`). A lavis-medblip model bundle "
        "(lavis-medblip is a plugin for Salesforce LAVIS), "
        f"architecture `{model['arch']}`, model type `{model.get('model_type') or '(custom)'}`, input volume "
        f"{model['image_size']}³. For research; not a medical device.",
        "",
        "## Files",
        "",
        "- `config.yaml`: the whole model config and preprocessing (no other YAML needed)",
        f"- `model.safetensors`: the trained parameters, {trained_summary(state)}",
        "- `calibration.json`: " + (calibration.describe() if not calibration.is_identity else "absent (uncalibrated)"),
        "",
        "## Base weights (not in this folder)",
        "",
        "As a training checkpoint, the bundle holds only what training changed. Loading builds the model from "
        "`config.yaml`, which fetches (or finds in the caches) these weights; set a key to a local copy with "
        "`options=[\"key=/path\"]` (`--options key=/path` on the command line).",
        "",
        "| part | config key | source |",
        "|---|---|---|",
        *base_weights(model),
        "",
        "## Training data",
        "",
        training_data or "Not stated.",
        "",
        "## Metrics",
        "",
        *(["| metric | value |", "|---|---|", *metric_rows] if metric_rows else ["Not stated."]),
        "",
        "## Use",
        "",
        "```python",
        "import lavis_medblip",
        "from lavis.models import load_model_and_preprocess",
        "from lavis_medblip.models import MedBLIP",
        "",
        'model = MedBLIP.from_pretrained("path/to/this/folder")  # or snapshot_download(repo_id)',
        'model, vis, txt = load_model_and_preprocess("medblip", model_type="path/to/this/folder", is_eval=True)',
        "```",
        "",
        "`python -m lavis_medblip.predict --model path/to/this/folder --image scan.nii.gz --text \"…\"`",
        "",
    ]
    return "\n".join(lines)
