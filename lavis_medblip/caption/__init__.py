"""The other published "MedBLIP" (Banerjee & Limbu 2025): BLIP fine-tuned for 2D radiology captioning.

Importing it registers the ``medblip_caption`` model, the paper's zero-shot baselines LAVIS lacks
(``vit_gpt2_caption``, ``instructblip_t5_caption``), the ``roco`` and ``medical_caption`` builders and
the ``medblip_captioning`` task; ``python -m lavis_medblip.caption_attention`` draws its attention maps.
"""
import lavis  # noqa: F401  (first, before our modules: see lavis_medblip/registration.py)
from lavis.models import model_zoo

from lavis_medblip.caption.datasets import MedicalCaptionBuilder, ROCOBuilder
from lavis_medblip.caption.hf_baselines import InstructBLIPT5Caption, ViTGPT2Caption
from lavis_medblip.caption.model import MedBLIPCaption
from lavis_medblip.caption.task import MedBLIPCaptioningTask

# LAVIS snapshots its registry into ``model_zoo`` when lavis.models is imported, before any plugin.
for _name, _model in (("medblip_caption", MedBLIPCaption), ("vit_gpt2_caption", ViTGPT2Caption),
                      ("instructblip_t5_caption", InstructBLIPT5Caption)):
    model_zoo.model_zoo[_name] = list(_model.PRETRAINED_MODEL_CONFIG_DICT)

__all__ = ["InstructBLIPT5Caption", "MedBLIPCaption", "MedBLIPCaptioningTask", "MedicalCaptionBuilder", "ROCOBuilder",
           "ViTGPT2Caption"]
