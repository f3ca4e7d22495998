"""Where weights come from: a URL (LAVIS's download cache), a local file, or a hub name/folder.

Every hub name or URL in a model YAML can be replaced by a local path; when a load fails, the
error names the YAML key to set.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from huggingface_hub.errors import HFValidationError

from lavis.common.dist_utils import download_cached_file
from lavis.common.utils import is_url


def read_state_dict(url_or_path: str, key: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict (its ``model`` entry when wrapped, as LAVIS saves them)."""
    if is_url(url_or_path):
        url_or_path = download_cached_file(url_or_path, check_hash=False, progress=True)
    elif not os.path.isfile(url_or_path):
        raise FileNotFoundError(f"model.{key}: no file at {url_or_path!r}; set model.{key} to a URL or a local file")
    checkpoint = torch.load(url_or_path, map_location="cpu", weights_only=False)
    return checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint


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
