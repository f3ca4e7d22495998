"""When lavis_medblip registers into LAVIS: at ``import lavis_medblip``, or as soon as LAVIS is imported.

Registering puts the plugin's models, processors, dataset builders, tasks and runner into
``lavis.common.registry``. Importing LAVIS, though, takes ~5 s (torch, torchvision, transformers),
and the cohort CLIs need only :mod:`lavis_medblip.annotations`. Python always runs
``lavis_medblip/__init__.py`` before any submodule, so the package cannot register eagerly and
still let ``lavis_medblip.annotations`` be imported cheaply. Instead :func:`register_with_lavis` (called by
``lavis_medblip/__init__.py``)

* registers at once when LAVIS is already imported (what ``import lavis_medblip`` always did);
* otherwise registers right after LAVIS finishes importing, whoever imports it (the finder of
  :mod:`lavis_medblip_autoregister`, which the installed ``.pth`` file also puts in place at
  interpreter start, so that programs importing only LAVIS find the plugin too). The registry
  cannot be read before LAVIS is imported, so it always looks as if the registration were eager.

Registering also makes LAVIS's ``cache_root`` follow the run being set up (:class:`RunCacheRoot`),
so relative storage paths resolve the same whichever script (ours or LAVIS's) starts the run.

Rule for this package: the registering subpackages (:data:`REGISTERING_SUBPACKAGES`) import LAVIS
before anything else (``import lavis`` as the first statement of their ``__init__``; ``models``
does it by importing ``lavis.models`` first). The deferred registration then never runs while one
of our modules is half-imported: another module importing a name from it would fail.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Mapping

import lavis_medblip_autoregister

#: Importing these registers everything (in this order, as ``lavis_medblip/__init__.py`` always did).
REGISTERING_SUBPACKAGES = ("datasets", "models", "processors", "runners", "tasks", "caption")


def cache_root_of(run_cfg: Mapping[str, Any]) -> str:
    """Where a run's relative storage paths resolve: ``run.cache_root``, by default the working directory."""
    return os.path.abspath(os.path.expanduser(str(run_cfg.get("cache_root", "."))))


class RunCacheRoot(os.PathLike):
    """LAVIS's ``cache_root`` path, read when used: :func:`cache_root_of` the config being run.

    LAVIS registers ``/export/home/.cache/lavis`` (its ``configs/default.yaml``) at import, and its
    ``Config`` registers itself as ``configuration``; builders join relative storage paths to
    ``cache_root`` with ``os.path.join``, which reads this path then.
    """

    def __fspath__(self) -> str:
        from lavis.common.registry import registry

        config = registry.get("configuration", no_warning=True)
        return cache_root_of(config.run_cfg if config is not None else {})

    def __str__(self) -> str:
        return self.__fspath__()

    def __repr__(self) -> str:
        return f"RunCacheRoot({self.__fspath__()!r})"


def register_all() -> None:
    """Import the subpackages whose import registers the plugin's classes (imports LAVIS), and :class:`RunCacheRoot`."""
    from lavis_medblip.compat import after_lavis

    after_lavis()  # LAVIS's BERT/T5/OPT classes generate with a newer transformers (a no-op on the lock's)
    for name in REGISTERING_SUBPACKAGES:
        importlib.import_module(f"lavis_medblip.{name}")
    from lavis.common.registry import registry

    if not isinstance(registry.get_path("cache_root"), RunCacheRoot):
        registry.mapping["paths"]["cache_root"] = RunCacheRoot()  # LAVIS's register_path takes strings only


def register_with_lavis() -> None:
    """Register now if LAVIS is imported, else as soon as it is (see the module docstring)."""
    if "lavis" in sys.modules:
        register_all()
    else:
        lavis_medblip_autoregister.install()
