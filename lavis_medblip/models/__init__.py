"""Registered models: ``medblip`` (3D MRI + EHR text → diagnosis) and ``medblip_caption`` (2D BLIP captioning)."""
from lavis.models import model_zoo

from lavis_medblip.models.caption_2d import MedBLIPCaption
from lavis_medblip.models.medblip import MedBLIP

# LAVIS snapshots its registry into ``model_zoo`` when lavis.models is imported, before any plugin.
model_zoo.model_zoo["medblip"] = list(MedBLIP.PRETRAINED_MODEL_CONFIG_DICT)
model_zoo.model_zoo["medblip_caption"] = list(MedBLIPCaption.PRETRAINED_MODEL_CONFIG_DICT)

__all__ = ["MedBLIP", "MedBLIPCaption"]
