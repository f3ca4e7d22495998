"""When lavis_medblip registers into LAVIS: at ``import lavis_medblip``, or as soon as LAVIS is imported.

``import lavis_medblip`` registers the plugin's models, processors, dataset builders, tasks and
runner into ``lavis.common.registry``; LAVIS users rely on it. Importing LAVIS, though, takes
~5 s (torch, torchvision, transformers), and the cohort CLIs need only :mod:`lavis_medblip.data`.
Python always runs ``lavis_medblip/__init__.py`` before any submodule, so the package cannot
register eagerly and still let ``lavis_medblip.data`` be imported cheaply. Instead
:func:`register_with_lavis` (called by ``lavis_medblip/__init__.py``)

* registers at once when LAVIS is already imported (what ``import lavis_medblip`` always did);
* otherwise registers right after LAVIS finishes importing, whoever imports it. The registry
  cannot be read before LAVIS is imported, so it always looks as if the registration were eager.

Rule for this package: the registering subpackages (:data:`REGISTERING_SUBPACKAGES`) import LAVIS
before anything else (``import lavis`` as the first statement of their ``__init__``; ``models``
does it by importing ``lavis.models`` first). The deferred registration then never runs while one
of our modules is half-imported: another module importing a name from it would fail.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Optional, Sequence

#: Importing these registers everything (in this order, as ``lavis_medblip/__init__.py`` always did).
REGISTERING_SUBPACKAGES = ("datasets", "models", "processors", "runners", "tasks")


def register_all() -> None:
    """Import the subpackages whose import registers the plugin's classes (imports LAVIS)."""
    for name in REGISTERING_SUBPACKAGES:
        importlib.import_module(f"lavis_medblip.{name}")


class _RegisterAfterLavisImport(importlib.abc.MetaPathFinder):
    """Finds ``lavis`` as the other finders would, and makes its loader call :func:`register_all` after it."""

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]] = None, target: Optional[ModuleType] = None
    ) -> Optional[ModuleSpec]:
        if fullname != "lavis":
            return None
        sys.meta_path.remove(self)  # used once; the lookup below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader

        def exec_then_register(module: ModuleType) -> None:
            del loader.exec_module  # back to the loader's own method
            loader.exec_module(module)
            register_all()

        loader.exec_module = exec_then_register  # this loader instance serves only this import
        return spec


def register_with_lavis() -> None:
    """Register now if LAVIS is imported, else as soon as it is (see the module docstring)."""
    if "lavis" in sys.modules:
        register_all()
    elif not any(isinstance(finder, _RegisterAfterLavisImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterLavisImport())
