"""Registered runner: ``medblip_runner`` (LAVIS's RunnerBase, made to run on CPU as on GPU)."""
from lavis_medblip.runners.runner import MedBLIPRunner

__all__ = ["MedBLIPRunner"]
