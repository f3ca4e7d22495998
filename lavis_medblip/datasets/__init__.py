"""Registered dataset builders.

3D brain MRI in the annotation schema: ``brain_mri``, ``adni``, ``nacc``, ``oasis``, ``aibl``, ``miriad``, ``bids``;
M3D-VQA: ``m3d_vqa``. The 2D captioning builders are :mod:`lavis_medblip.caption`'s.
"""
import lavis  # noqa: F401  (first, before our modules: see lavis_medblip/registration.py)
from lavis_medblip.datasets.builders import (
    ADNIBuilder, AIBLBuilder, BIDSBuilder, BrainMRIBuilder, MIRIADBuilder, NACCBuilder, OASISBuilder,
)
from lavis_medblip.datasets.m3d_vqa import M3DVQABuilder, M3DVQADataset
from lavis_medblip.datasets.mri_dataset import MRIAnnotationDataset

__all__ = ["ADNIBuilder", "AIBLBuilder", "BIDSBuilder", "BrainMRIBuilder", "M3DVQABuilder", "M3DVQADataset", "MIRIADBuilder",
           "MRIAnnotationDataset", "NACCBuilder", "OASISBuilder"]
