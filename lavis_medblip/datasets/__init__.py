"""Registered dataset builders: ``brain_mri``, ``adni``, ``nacc``, ``oasis``, ``aibl``, ``miriad``, ``m3d_vqa``."""
from lavis_medblip.datasets.builders import (
    ADNIBuilder, AIBLBuilder, BrainMRIBuilder, MIRIADBuilder, NACCBuilder, OASISBuilder,
)
from lavis_medblip.datasets.m3d_vqa import M3DVQABuilder, M3DVQADataset
from lavis_medblip.datasets.mri_dataset import MRIAnnotationDataset

__all__ = ["ADNIBuilder", "AIBLBuilder", "BrainMRIBuilder", "M3DVQABuilder", "M3DVQADataset", "MIRIADBuilder",
           "MRIAnnotationDataset", "NACCBuilder", "OASISBuilder"]
