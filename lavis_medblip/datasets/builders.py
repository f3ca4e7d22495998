"""Registered LAVIS dataset builders for brain-MRI cohorts in the project's annotation schema
(``brain_mri``, ``adni``, ``nacc``, ``oasis``, ``aibl``, ``miriad``, ``bids``); nothing is ever downloaded.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder

from lavis_medblip.datasets.mri_dataset import MRIAnnotationDataset

logger = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "datasets"


#: Without a model config (a builder used on its own): the processors' own defaults.
STANDALONE_PREPROCESS = {"vis_processor": {"train": {"name": "mri_volume_train"}, "eval": {"name": "mri_volume_eval"}},
                         "text_processor": {"train": {"name": "medblip_text"}, "eval": {"name": "medblip_text"}}}


def processor_config(dataset_config: DictConfig, kind: str, split: str) -> DictConfig:
    """A dataset's ``<kind>.<split>`` processor: the model's ``preprocess`` block, then the dataset's on top.

    The model's block (``configs/medblip_*.yaml``) sets what the model was built for (``image_size``,
    the demo's harmonisation); a dataset block adds to it (e.g. ``cache_dir``). A dataset block that
    sets another ``image_size`` than the model's is an error: the 3D stem takes that size only.
    """
    configuration = registry.get("configuration", no_warning=True)  # LAVIS's latest Config ...
    config = configuration.config if configuration is not None else OmegaConf.create({})
    if not any(node is dataset_config for node in (config.get("datasets") or {}).values()):
        config = OmegaConf.create({})  # ... but this dataset is not part of it: a builder used on its own
    preprocess = config.get("preprocess") or OmegaConf.create(STANDALONE_PREPROCESS)
    model_block = OmegaConf.select(preprocess, f"{kind}.{split}") or {}
    own_block = OmegaConf.select(dataset_config, f"{kind}.{split}") or {}
    model_block = OmegaConf.to_container(model_block, resolve=True) if OmegaConf.is_config(model_block) else model_block
    merged = OmegaConf.merge(model_block, own_block)
    model_size = OmegaConf.select(config, "model.image_size")
    if kind == "vis_processor" and model_size is not None and merged.get("image_size", model_size) != model_size:
        raise ValueError(f"{kind}.{split}.image_size is {merged.image_size} but model.image_size is {model_size}: "
                         f"the 3D stem is built for model.image_size; leave image_size out of the dataset's block")
    return merged


def resolve_storage(path: str) -> str:
    """Absolute paths stay; relative ones are joined to LAVIS's ``cache_root``."""
    path = os.path.expanduser(str(path))
    return path if os.path.isabs(path) else os.path.join(registry.get_path("cache_root"), path)


class AnnotationBuilder(BaseDatasetBuilder):
    """Builds one dataset per split listed in ``build_info.annotations`` (nothing to download).

    A builder is LAVIS's three attributes plus a defaults YAML (``configs/datasets/<name>.yaml``):
    annotation files per split, an optional image root, the classes, and ``on_error``. A project
    YAML drops a default split with ``<split>: null``; ``brain_mri`` has no default splits. Relative
    storage paths resolve against LAVIS's ``cache_root`` (``run.cache_root``, else the working
    directory, whichever script starts the run: :class:`lavis_medblip.registration.RunCacheRoot`); absolute paths are used as they are. The processors are the model's (its
    ``preprocess`` section, see :func:`processor_config`).

    Subclasses name their dataset classes and add their own constructor keywords in
    :meth:`dataset_kwargs`.
    """

    def build_datasets(self) -> dict[str, Any]:
        self.build_processors()
        return self.build()

    def build_processors(self) -> None:
        """LAVIS's, from :func:`processor_config` (the model's preprocessing, then this dataset's)."""
        for kind, built in (("vis_processor", self.vis_processors), ("text_processor", self.text_processors)):
            for split in ("train", "eval"):
                built[split] = self._build_proc_from_cfg(processor_config(self.config, kind, split))

    def dataset_kwargs(self, split: str) -> dict[str, Any]:
        return {}

    def build(self) -> dict[str, Any]:
        build_info = self.config.build_info
        image_root = (build_info.get("images") or {}).get("storage")
        datasets = {}
        for split, info in build_info.annotations.items():
            storage = info.get("storage") if info is not None else None
            if not storage:  # a split set to null in a project YAML is not built
                continue
            paths = [resolve_storage(p) for p in (list(storage) if OmegaConf.is_list(storage) or isinstance(storage, list) else [storage])]
            is_train = split == "train"
            dataset_cls = self.train_dataset_cls if is_train else self.eval_dataset_cls
            datasets[split] = dataset_cls(
                vis_processor=self.vis_processors["train" if is_train else "eval"],
                text_processor=self.text_processors["train" if is_train else "eval"],
                ann_paths=paths,
                image_root=resolve_storage(image_root) if image_root else None,
                on_error=self.config.get("on_error", "raise"),
                **self.dataset_kwargs(split),
            )
            logger.info("%s/%s: %d samples from %s", type(self).__name__, split, len(datasets[split]), paths)
        return datasets


class BrainMRIBuilder(AnnotationBuilder):
    """Any dataset in the annotation schema; the cohort builders below differ only in defaults."""

    train_dataset_cls = MRIAnnotationDataset
    eval_dataset_cls = MRIAnnotationDataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "brain_mri.yaml")}

    def dataset_kwargs(self, split: str) -> dict[str, Any]:
        return {"class_names": list(self.config.get("classes", ["NC", "MCI", "AD"])), "require_label": split != "train"}


registry.register_builder("brain_mri")(BrainMRIBuilder)


@registry.register_builder("adni")
class ADNIBuilder(BrainMRIBuilder):
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "adni.yaml")}


@registry.register_builder("nacc")
class NACCBuilder(BrainMRIBuilder):
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "nacc.yaml")}


@registry.register_builder("oasis")
class OASISBuilder(BrainMRIBuilder):
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "oasis.yaml")}


@registry.register_builder("aibl")
class AIBLBuilder(BrainMRIBuilder):
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "aibl.yaml")}


@registry.register_builder("miriad")
class MIRIADBuilder(BrainMRIBuilder):
    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "miriad.yaml")}


@registry.register_builder("bids")
class BIDSBuilder(BrainMRIBuilder):
    """A folder written by ``python -m dataset_builders.bids``: ``build_info.dir`` + ``build_info.splits``.

    Each split reads ``<dir>/<split>.jsonl``; a split given under ``build_info.annotations`` wins.
    """

    DATASET_CONFIG_DICT = {"default": str(CONFIG_DIR / "bids.yaml")}

    def build(self) -> dict[str, Any]:
        build_info = self.config.build_info
        folder = build_info.get("dir")
        explicit = OmegaConf.to_container(build_info.get("annotations") or OmegaConf.create({}))
        if folder:
            for split in build_info.get("splits") or ():
                explicit.setdefault(split, {"storage": os.path.join(str(folder), f"{split}.jsonl")})
        build_info.annotations = OmegaConf.create(explicit)
        return super().build()
