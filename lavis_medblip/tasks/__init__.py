"""Registered tasks: ``medblip_pretrain``, ``medblip_classification``, ``medblip_vqa`` (captioning: :mod:`lavis_medblip.caption`)."""
from lavis_medblip.tasks.classification import MedBLIPClassificationTask
from lavis_medblip.tasks.pretrain import MedBLIPPretrainTask
from lavis_medblip.tasks.vqa import MedBLIPVQATask

__all__ = ["MedBLIPClassificationTask", "MedBLIPPretrainTask", "MedBLIPVQATask"]
