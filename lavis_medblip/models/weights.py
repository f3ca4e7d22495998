"""Where weights come from: a URL (LAVIS's download cache), a local file, or a hub name/folder.
Every hub name or URL in a model YAML can be replaced by a local path; when a load fails, the
error names the YAML key to set.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from huggingface_hub.errors import HFValidationError

from lavis.common.dist_utils import download_cached_file
from lavis.common.utils import is_url

#: Checkpoints written before 2026-12-04 kept numpy's RNG state as a uint32 array; these rebuild
#: such an array from its bytes and run no other code.
NUMPY_ARRAY_GLOBALS = (np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)))


class CheckpointError(RuntimeError):
    """A model file cannot be loaded, or does not fit the model; the message names the file."""

    def __init__(self, path: Any, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{self.path}: {problem}")


def read_checkpoint(url_or_path: str | os.PathLike, key: str = "finetuned") -> Any:
    """The object a ``.pth`` holds (``key`` names the YAML key for the not-found message).

    The package's only ``torch.load``: with ``weights_only=True``, so a file holds tensors, numbers,
    strings and plain containers, and a file that needs pickled code to load is refused before any
    of it runs.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated or not a
    checkpoint, or when loading it would need pickled code (the code is not run).
    """
    path = os.fspath(url_or_path)
    if is_url(path):
        path = download_cached_file(path, check_hash=False, progress=True)
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"model.{key}: no file at {path!r}; set model.{key} to a URL or a local file")
    try:
        with torch.serialization.safe_globals(list(NUMPY_ARRAY_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests retrying without weights_only; keep only what it refused
        refused = [line for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        reason = refused[0].strip() if refused else type(error).__name__
        raise CheckpointError(
            path, "refused: loading it would run pickled code, which a model file from anyone could abuse "
                  f"({reason}). Only tensors, numbers, strings and plain containers are loaded "
                  "(torch.load weights_only=True); if you trust the file, re-save its state dict with torch.save",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        size = os.path.getsize(path)
        raise CheckpointError(
            path, f"not a readable PyTorch checkpoint ({size} bytes; truncated, empty or another format): "
                  f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}",
        ) from error


def state_dict_of(checkpoint: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A loaded checkpoint's state dict (its ``model`` entry when wrapped, as LAVIS saves them)."""
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(path, f"holds a {type(state_dict).__name__}, not a state dict of tensors")
    return state_dict


def read_state_dict(url_or_path: str | os.PathLike, key: str) -> dict[str, torch.Tensor]:
    """:func:`read_checkpoint`, then :func:`state_dict_of`."""
    return state_dict_of(read_checkpoint(url_or_path, key), url_or_path)


def model_name(config: Any) -> str:
    """"<arch> <model_type>" of a model config ("" when it has neither)."""
    if not isinstance(config, Mapping):
        return ""
    return " ".join(str(config[part]) for part in ("arch", "model_type") if config.get(part))


def check_fits(path: str | os.PathLike, checkpoint: Any, own: Mapping[str, torch.Tensor],
               required: Iterable[str] = (), this_model: str = "") -> None:
    """Raise :class:`CheckpointError` unless every tensor of ``checkpoint`` has a key of the same shape in ``own``
    and every ``required`` (trainable) key is there.

    The message lists shape mismatches (key, both shapes), unexpected and missing keys, and the
    model the checkpoint was saved from when it records its config.
    """
    state_dict = state_dict_of(checkpoint, path)
    mismatched = [f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(own[key].shape)}"
                  for key, tensor in state_dict.items() if key in own and tensor.shape != own[key].shape]
    unexpected = [key for key in state_dict if key not in own]
    missing = sorted(set(required) - set(state_dict))
    problems = [f"{label} {keys[:10]}" for label, keys in (
        ("shape mismatches", mismatched), ("unexpected keys", unexpected), ("missing trainable keys", missing)) if keys]
    if not problems:
        return
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    saved_from = model_name(config.get("model", config) if isinstance(config, Mapping) else None)  # runner: run config
    raise CheckpointError(path, f"does not fit this {this_model or 'model'}"
                                + (f" (it was saved from {saved_from})" if saved_from else "") + ": " + "; ".join(problems))


def from_pretrained_or_explain(loader: Callable[..., Any], key: str, source: str | None, **kwargs: Any) -> Any:
    """Call a Hugging Face ``from_pretrained``; a failure names the YAML key to point at a folder."""
    if source is None:
        raise ValueError(f"set model.{key} to a Hugging Face hub name or a local folder")
    try:
        return loader(source, **kwargs)
    except (OSError, HFValidationError) as error:  # not found / not a valid hub name
        raise OSError(
            f"could not load {source!r} for model.{key} (offline, or not a model folder). "
            f"Set model.{key} to a local folder that holds it. Cause: {error}"
        ) from error
