"""MedBLIP for 3D brain MRI and EHR text, as a plugin for Salesforce LAVIS.

Importing this package registers its models, processors, dataset builders, tasks and runners
into ``lavis.common.registry`` (the same registry whether LAVIS was imported before or after).
Importing never touches the network.
"""
from lavis_medblip import assets, pretrained  # noqa: F401  (YAML resolvers ${medblip_asset:…}, ${medblip_pretrained:…})
from lavis_medblip import datasets, models, processors, runners, tasks  # noqa: F401

__version__ = "0.1.0"
