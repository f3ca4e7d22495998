"""Registered tasks: ``medblip_pretrain``, ``medblip_classification``, ``medblip_vqa``, ``medblip_captioning``."""
from lavis_medblip.tasks.captioning import MedBLIPCaptioningTask
from lavis_medblip.tasks.classification import MedBLIPClassificationTask
from lavis_medblip.tasks.pretrain import MedBLIPPretrainTask
from lavis_medblip.tasks.vqa import MedBLIPVQATask

__all__ = ["MedBLIPCaptioningTask", "MedBLIPClassificationTask", "MedBLIPPretrainTask", "MedBLIPVQATask"]
