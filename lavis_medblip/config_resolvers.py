"""OmegaConf resolvers that let YAML files name packaged assets and local pretrained folders.

``${medblip_pretrained:<name>}`` (the tests' and the demo's small real weights) imports
:mod:`lavis_medblip.dev.pretrained` only when a config is resolved that uses it.
"""
from __future__ import annotations

import warnings
from typing import Callable

from omegaconf import OmegaConf


def register_resolver(name: str, resolver: Callable[[str], str]) -> None:
    """Register once; a second import (or reload) keeps the first registration."""
    if OmegaConf.has_resolver(name):
        return
    with warnings.catch_warnings():  # omegaconf 2.4 deprecates the name LAVIS's pinned 2.1 still needs
        warnings.simplefilter("ignore", UserWarning)
        OmegaConf.register_new_resolver(name, resolver)


def _local_pretrained_model(name: str) -> str:
    from lavis_medblip.dev.pretrained import local_model_path  # dev plumbing, out of the package's import path

    return str(local_model_path(name))


register_resolver("medblip_pretrained", _local_pretrained_model)
