"""The other published "MedBLIP" (Banerjee & Limbu 2025): BLIP fine-tuned for 2D radiology captioning.

Importing it registers the ``medblip_caption`` model, the ``roco`` and ``medical_caption`` builders and
the ``medblip_captioning`` task; ``python -m lavis_medblip.caption_attention`` draws its attention maps.
"""
import lavis  # noqa: F401  (first, before our modules: see lavis_medblip/registration.py)
from lavis.models import model_zoo

from lavis_medblip.caption.datasets import MedicalCaptionBuilder, ROCOBuilder
from lavis_medblip.caption.model import MedBLIPCaption
from lavis_medblip.caption.task import MedBLIPCaptioningTask

# LAVIS snapshots its registry into ``model_zoo`` when lavis.models is imported, before any plugin.
model_zoo.model_zoo["medblip_caption"] = list(MedBLIPCaption.PRETRAINED_MODEL_CONFIG_DICT)

__all__ = ["MedBLIPCaption", "MedBLIPCaptioningTask", "MedicalCaptionBuilder", "ROCOBuilder"]
