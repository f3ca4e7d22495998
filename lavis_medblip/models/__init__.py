"""Registered models: ``medblip`` (3D MRI + EHR text → diagnosis) and ``medblip_linear_probe`` (Table 4: a linear
head on its visual features). The 2D captioner is :mod:`lavis_medblip.caption`."""
from lavis.models import model_zoo

from lavis_medblip.models.medblip import MedBLIP
from lavis_medblip.models.linear_probe import MedBLIPLinearProbe

# LAVIS snapshots its registry into ``model_zoo`` when lavis.models is imported, before any plugin.
model_zoo.model_zoo["medblip"] = list(MedBLIP.PRETRAINED_MODEL_CONFIG_DICT)
model_zoo.model_zoo["medblip_linear_probe"] = list(MedBLIPLinearProbe.PRETRAINED_MODEL_CONFIG_DICT)

__all__ = ["MedBLIP", "MedBLIPLinearProbe"]
