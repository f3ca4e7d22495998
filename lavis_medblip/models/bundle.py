"""Self-contained model bundles: one flat folder that rebuilds a trained MedBLIP with no other file.

::

    <folder>/config.yaml         the whole model config (every key: no model type or YAML needed) + preprocess
    <folder>/model.safetensors   the trained parameters, what a checkpoint holds (safetensors: loading runs no code)
    <folder>/calibration.json    the fitted calibration (only when there is one)
    <folder>/README.md           the model card, with Hugging Face front matter (library_name, tags, license)

It follows huggingface_hub's conventions (flat, config + weights + card), so ``upload_folder`` publishes
it and ``MedBLIP.from_pretrained(snapshot_download(repo_id))`` loads it back.

The frozen base weights are **not** copied, exactly as in a checkpoint: ``config.yaml`` says where they
come from (``vision.weights``, ``qformer_pretrained``, ``qformer.bert``, ``lm.model``: URLs, hub names or
local folders), and the parts without pretrained weights are rebuilt from ``init_seed``. Loading therefore
downloads (or finds in the caches) the same base weights a model type's YAML names; ``--options`` /
``options`` point a key at a local copy. Packaged assets and the checkout's local pretrained folders are
written as ``${medblip_asset:…}`` / ``${medblip_pretrained:…}``, so a bundle moves between machines.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from lavis_medblip.models.bundle_card import model_card
from lavis_medblip.models.calibration import Calibration
from lavis_medblip.models.config import BASE_CONFIG_FILE, MODEL_TYPES, MedBLIPConfig, load_model_config
from lavis_medblip.models.weights import CheckpointError, read_checkpoint
from lavis_medblip.storage import atomic_file

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
CALIBRATION_FILE = "calibration.json"
CARD_FILE = "README.md"
#: Written into config.yaml (``bundle.format``) and the safetensors metadata; a reader refuses a newer one.
BUNDLE_FORMAT = 1
#: How other formats begin: a ``torch.save`` zip archive, a legacy pickle (protocol 2+).
PICKLE_MAGIC = {b"PK\x03\x04": "a zip archive (torch.save's format: a pickled .pth)", b"\x80": "a Python pickle"}
#: Model-config keys that concern where the model was trained, not what it is: a bundle clears them.
LOCAL_KEYS = {"load_finetuned": False, "finetuned": None, "vision_feature_cache": None}


def is_bundle(path: Any) -> bool:
    """Whether ``path`` names a folder (a model type or a file never does): it is read as a bundle."""
    return isinstance(path, (str, os.PathLike)) and os.path.isdir(path)


# ---- writing --------------------------------------------------------------------------------------


def portable_paths(value: Any) -> Any:
    """``value`` with every packaged asset folder and local pretrained folder written as its resolver."""
    from lavis_medblip.assets import _ASSETS
    from lavis_medblip.dev.pretrained import LOCAL_MODELS, pretrained_root

    folders = {str(path): f"${{medblip_asset:{name}}}" for name, path in _ASSETS.items()}
    folders.update({str(pretrained_root() / sub): f"${{medblip_pretrained:{name}}}"
                    for name, sub in LOCAL_MODELS.items()})
    if isinstance(value, Mapping):
        return {key: portable_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable_paths(item) for item in value]
    return folders.get(value, value) if isinstance(value, str) else value


def default_preprocess(model_type: str) -> DictConfig:
    """The preprocess section of the model type's YAML (``medblip_base.yaml``'s for another model)."""
    if model_type in MODEL_TYPES:
        return load_model_config(model_type).preprocess
    return OmegaConf.load(BASE_CONFIG_FILE).preprocess


def bundle_config(config: MedBLIPConfig, preprocess: Any = None) -> dict[str, Any]:
    """What ``config.yaml`` holds: ``model`` (every key, :data:`LOCAL_KEYS` cleared), ``preprocess`` (resolved
    against it), ``bundle`` (the format)."""
    model = {**config.to_dict(), **LOCAL_KEYS}
    preprocess = default_preprocess(config.model_type) if preprocess is None else preprocess
    if OmegaConf.is_config(preprocess):
        preprocess = OmegaConf.to_container(preprocess)  # interpolations (${model.image_size}) kept, resolved below
    resolved = OmegaConf.to_container(OmegaConf.create({"model": model, "preprocess": preprocess}), resolve=True)
    return {**portable_paths(resolved), "bundle": {"format": BUNDLE_FORMAT}}


def read_metrics(metrics: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any] | None:
    """Metrics for the card: a mapping, or a JSON file holding one (e.g. a run's evaluate.txt line)."""
    if metrics is None or isinstance(metrics, Mapping):
        return None if metrics is None else dict(metrics)
    try:
        values = json.loads(Path(metrics).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{metrics}: not a readable JSON file of metrics ({error})") from None
    if not isinstance(values, Mapping):
        raise ValueError(f"{metrics}: holds a {type(values).__name__}, not a JSON object of metrics")
    return dict(values)


def write_bundle(model: Any, directory: str | os.PathLike, metrics: Any = None, training_data: str | None = None,
                 preprocess: Any = None, license: str = "other") -> Path:
    """Write ``model`` (a MedBLIP) as a bundle into ``directory`` (created; our files in it replaced, each
    atomically). ``metrics``: a mapping or a JSON file; ``training_data``: a line for the card."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.contiguous() for name, tensor in model.checkpoint_state_dict().items()}
    config = bundle_config(model.config, preprocess)
    metadata = {"format": "pt", "lavis_medblip_bundle": str(BUNDLE_FORMAT), "arch": model.config.arch,
                "model_type": model.config.model_type}
    with atomic_file(directory / WEIGHTS_FILE) as handle:
        handle.write(save(state, metadata=metadata))
    with atomic_file(directory / CONFIG_FILE, "w", encoding="utf-8") as handle:
        handle.write(f"# A lavis-medblip model bundle: the whole config of the model in {WEIGHTS_FILE}.\n"
                     "# Frozen base weights are not in this folder: the keys below say where they come from.\n")
        handle.write(OmegaConf.to_yaml(OmegaConf.create(config)))
    calibration = model.calibration
    if calibration.is_identity:
        (directory / CALIBRATION_FILE).unlink(missing_ok=True)  # a stale one would apply on load
    else:
        with atomic_file(directory / CALIBRATION_FILE, "w", encoding="utf-8") as handle:
            json.dump(calibration.to_dict(), handle, indent=2)
    with atomic_file(directory / CARD_FILE, "w", encoding="utf-8") as handle:
        handle.write(model_card(config, state, calibration, read_metrics(metrics), training_data, license))
    logger.info("Saved a model bundle (%d trained tensors) to %s", len(state), directory)
    return directory


# ---- reading --------------------------------------------------------------------------------------


def required_file(directory: str | os.PathLike, name: str) -> Path:
    """``directory/name``, or a :class:`CheckpointError` naming it when it is missing."""
    path = Path(directory) / name
    if not Path(directory).is_dir():
        raise CheckpointError(directory, "a file, not a model bundle folder (pass the folder that holds it)"
                              if Path(directory).is_file() else "no such model bundle folder")
    if not path.is_file():
        present = sorted(item.name for item in Path(directory).iterdir())
        raise CheckpointError(path, f"missing: a model bundle needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                                    f"(the folder holds {present}); write one with save_pretrained or "
                                    "python -m lavis_medblip.export")
    return path


def read_bundle_config(directory: str | os.PathLike, options: Sequence[str] = ()) -> DictConfig:
    """The bundle's ``config.yaml`` (``model``, ``preprocess``), checked as the model reads it (a
    :class:`CheckpointError` naming the file), with ``key=value`` ``options`` (:func:`merge_options`)."""
    path = required_file(directory, CONFIG_FILE)
    try:
        config = OmegaConf.load(path)
    except Exception as error:  # yaml's and OmegaConf's errors share no base class
        raise CheckpointError(path, f"not a readable YAML config: {type(error).__name__}: {error}") from None
    if not isinstance(config, DictConfig) or "model" not in config:
        raise CheckpointError(path, "has no 'model' section: not a model bundle's config")
    found = OmegaConf.select(config, "bundle.format", default=BUNDLE_FORMAT)
    if not isinstance(found, int) or found > BUNDLE_FORMAT:
        raise CheckpointError(path, f"bundle format {found!r}; this lavis-medblip reads format {BUNDLE_FORMAT} "
                                    "or older (upgrade lavis-medblip)")
    try:
        MedBLIPConfig.from_dict(config.model)
    except ValueError as error:
        raise CheckpointError(path, f"not a valid model config: {error}") from None
    return merge_options(config, options)


def merge_options(config: DictConfig, options: Sequence[str]) -> DictConfig:
    """``config`` with ``key=value`` ``options`` merged into its ``model`` section, checked as the model reads
    them: an unknown or misspelt key is a ``ValueError`` naming the options, not a silently kept default."""
    malformed = [option for option in options if "=" not in option]
    if malformed:
        raise ValueError(f"--options takes key=value pairs, got {malformed}")
    config.model = OmegaConf.merge(config.model, OmegaConf.from_dotlist(list(options)))
    try:
        MedBLIPConfig.from_dict(config.model)
    except ValueError as error:
        raise ValueError(f"--options {list(options)}: {error}") from None
    return config


def read_weights(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors``; a pickle under that name is refused unread."""
    path = required_file(directory, WEIGHTS_FILE)
    with open(path, "rb") as handle:
        head = handle.read(9)  # safetensors: the header's length (8 bytes, little-endian), then its JSON
    kind = next((what for magic, what in PICKLE_MAGIC.items() if head.startswith(magic)), None)
    if kind is not None and head[8:] != b"{":
        raise CheckpointError(path, f"is {kind}, not a safetensors file; it was not loaded (unpickling can run "
                                    "code). Convert a .pth checkpoint with python -m lavis_medblip.export")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(path, f"not a readable safetensors file ({path.stat().st_size} bytes; truncated or "
                                    f"another format): {error}") from None


def read_calibration(directory: str | os.PathLike) -> dict[str, Any] | None:
    """``calibration.json``'s values (checked), or None when the bundle has none."""
    path = Path(directory) / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        return Calibration.from_dict(json.loads(path.read_text(encoding="utf-8"))).to_dict()
    except ValueError as error:  # JSONDecodeError is a ValueError
        raise CheckpointError(path, f"not a valid calibration: {error}") from None


def read_bundle_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """A bundle as a loaded checkpoint (``model``, ``config``, ``calibration``) and the file its tensors come
    from, for ``MedBLIP.load_checkpoint``; every file is checked first."""
    config = read_bundle_config(directory)
    checkpoint = {"model": read_weights(directory), "config": OmegaConf.to_container(config.model, resolve=True)}
    calibration = read_calibration(directory)
    if calibration is not None:
        checkpoint["calibration"] = calibration
    return checkpoint, str(Path(directory) / WEIGHTS_FILE)


def read_model_file(url_or_path: str | os.PathLike, key: str = "finetuned") -> tuple[Any, str]:
    """A loaded checkpoint and the file it comes from: a bundle folder's (:func:`read_bundle_checkpoint`) or a
    ``.pth``'s (:func:`~lavis_medblip.models.weights.read_checkpoint`, ``key`` its YAML key)."""
    if is_bundle(url_or_path):
        return read_bundle_checkpoint(url_or_path)
    return read_checkpoint(url_or_path, key=key), str(url_or_path)


class BundleMixin:
    """``save_pretrained`` / ``from_pretrained`` for bundles, in the spirit of huggingface_hub's ModelHubMixin.

    ``from_pretrained`` keeps LAVIS's meaning for a registered model type (``load_model_and_preprocess``
    calls it) and reads a folder as a bundle, so ``load_model_and_preprocess("medblip", model_type=folder)``
    loads a bundle with its preprocessing.
    """

    def save_pretrained(self, directory: str | os.PathLike, metrics: Any = None, training_data: str | None = None,
                        preprocess: Any = None, license: str = "other") -> Path:
        """Write this model as a bundle (see :mod:`lavis_medblip.models.bundle`); returns the folder."""
        return write_bundle(self, directory, metrics, training_data, preprocess, license)

    @classmethod
    def from_pretrained(cls, model_type: str | os.PathLike, options: Sequence[str] = ()) -> Any:
        """A registered model type (LAVIS's from_pretrained: its YAML and the weights it names) or a bundle folder."""
        if isinstance(model_type, str) and model_type in cls.PRETRAINED_MODEL_CONFIG_DICT and not options:
            return super().from_pretrained(model_type)
        if is_bundle(model_type):
            return cls.from_pretrained_dir(model_type, options)
        raise ValueError(f"{model_type!r} is neither a model type of {sorted(cls.PRETRAINED_MODEL_CONFIG_DICT)} nor a "
                         "model bundle folder" + (" (options apply to bundles only)" if options else ""))

    @classmethod
    def from_pretrained_dir(cls, directory: str | os.PathLike, options: Sequence[str] = ()) -> Any:
        """Build from the bundle's config (``options``: ``key=value`` overrides, e.g. ``lm.model=/models/lm``),
        then load its trained parameters and calibration. Every file is checked before the (slow) build."""
        config = read_bundle_config(directory, options)
        read_bundle_checkpoint(directory)  # safetensors maps the file: reading it twice costs little
        model = cls.from_config(config.model)
        model.load_checkpoint(str(directory))
        return model
