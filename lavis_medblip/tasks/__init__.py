"""Registered tasks: ``medblip_pretrain``, ``medblip_classification``."""
from lavis_medblip.tasks.classification import MedBLIPClassificationTask
from lavis_medblip.tasks.pretrain import MedBLIPPretrainTask

__all__ = ["MedBLIPClassificationTask", "MedBLIPPretrainTask"]
