"""MedBLIP for 3D brain MRI and EHR text, as a plugin for Salesforce LAVIS.

Importing this package registers its models, processors, dataset builders, tasks and runners
into ``lavis.common.registry`` (the same registry whether LAVIS was imported before or after):
at once if LAVIS is already imported, otherwise the moment it is (see
:mod:`lavis_medblip.registration`; installed, the package needs no import at all: see
:mod:`lavis_medblip_autoregister`). Until then nothing heavy is imported, so
:mod:`lavis_medblip.annotations` (annotation schema, EHR text, labels; what the cohort CLIs use) stays
free of LAVIS, torch and transformers. Importing never touches the network.
"""
import importlib
from types import ModuleType

from lavis_medblip import assets, config_resolvers  # noqa: F401  (YAML resolvers ${medblip_asset:…}, ${medblip_pretrained:…})
from lavis_medblip.registration import REGISTERING_SUBPACKAGES, register_with_lavis

__version__ = "0.1.0"

register_with_lavis()


def __getattr__(name: str) -> ModuleType:
    # ``lavis_medblip.models`` etc. work after a bare ``import lavis_medblip``, as they always did
    # (importing one imports LAVIS, which registers everything).
    if name in REGISTERING_SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
