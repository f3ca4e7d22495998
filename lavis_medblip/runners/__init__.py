"""Registered runner: ``medblip_runner`` (LAVIS's RunnerBase, made to run on CPU as on GPU)."""
import lavis  # noqa: F401  (first, before our modules: see lavis_medblip/registration.py)
from lavis_medblip.runners.runner import MedBLIPRunner

__all__ = ["MedBLIPRunner"]
