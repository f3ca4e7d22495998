"""OmegaConf resolvers that let YAML files name packaged assets and local pretrained folders."""
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
