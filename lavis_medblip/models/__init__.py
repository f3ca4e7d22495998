"""Registered model: ``medblip`` (3D MRI + EHR text → diagnosis). The 2D captioner is :mod:`lavis_medblip.caption`."""
from lavis.models import model_zoo

from lavis_medblip.models.medblip import MedBLIP

# LAVIS snapshots its registry into ``model_zoo`` when lavis.models is imported, before any plugin.
model_zoo.model_zoo["medblip"] = list(MedBLIP.PRETRAINED_MODEL_CONFIG_DICT)

__all__ = ["MedBLIP"]
