"""Vendored reference data: the ICBM-2009c T1 template, its brain mask and the CerebrA atlas.
See ``brain/README.md`` for provenance; ``brain/COPYING.MNI`` is the notice that must travel with
the template. CerebrA: Manera et al., Scientific Data 7, 237 (2020).
"""
from __future__ import annotations

from pathlib import Path

from lavis_medblip.config_resolvers import register_resolver

BRAIN_DIR = Path(__file__).resolve().parent / "brain"
ICBM_T1 = BRAIN_DIR / "icbm152_2009c_t1_1mm.nii.gz"
ICBM_BRAIN_MASK = BRAIN_DIR / "icbm152_2009c_brainmask_1mm.nii.gz"
CEREBRA_LABELS = BRAIN_DIR / "cerebra_labels_1mm.nii.gz"
CEREBRA_LABEL_TABLE = BRAIN_DIR / "CerebrA_LabelDetails.csv"

BERT_UNCASED_VOCAB_DIR = Path(__file__).resolve().parent / "bert-base-uncased"
_ASSETS = {"bert-base-uncased": BERT_UNCASED_VOCAB_DIR, "brain": BRAIN_DIR}


def asset_path(name: str) -> str:
    """Folder of a vendored asset by name (used in YAML as ``${medblip_asset:bert-base-uncased}``)."""
    if name not in _ASSETS:
        raise KeyError(f"unknown asset {name!r}. Available: {sorted(_ASSETS)}")
    return str(_ASSETS[name])


register_resolver("medblip_asset", asset_path)
