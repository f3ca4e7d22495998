"""Registered dataset builders: ``brain_mri``, ``adni``, ``nacc``, ``oasis``, ``aibl``, ``miriad``."""
from lavis_medblip.datasets.builders import (
    ADNIBuilder, AIBLBuilder, BrainMRIBuilder, MIRIADBuilder, NACCBuilder, OASISBuilder,
)
from lavis_medblip.datasets.mri_dataset import MRIAnnotationDataset

__all__ = ["ADNIBuilder", "AIBLBuilder", "BrainMRIBuilder", "MIRIADBuilder", "MRIAnnotationDataset", "NACCBuilder",
           "OASISBuilder"]
