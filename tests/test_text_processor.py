"""The registered ``medblip_text`` processor: clinical text keeps its digits, case and punctuation."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

import lavis_medblip.processors  # noqa: F401  (registers the processors)
from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor
from lavis_medblip.processors.text import MedBlipTextProcessor


def test_registered_as_a_lavis_processor():
    processor_class = registry.get_processor_class("medblip_text")
    assert processor_class is MedBlipTextProcessor and issubclass(processor_class, BaseProcessor)


def test_ehr_text_survives_unchanged_apart_from_whitespace():
    processor = MedBlipTextProcessor.from_config(None)
    ehr = "  Female, 74 y.\n\tMMSE 24, CDR 0.5.  APOE4: 1 allele;\u00a0dx = MCI (amnestic)?  "
    assert processor(ehr) == "Female, 74 y. MMSE 24, CDR 0.5. APOE4: 1 allele; dx = MCI (amnestic)?"


def test_truncates_to_max_words():
    processor = registry.get_processor_class("medblip_text").from_config(OmegaConf.create({"max_words": 4}))
    assert processor("Age 71 , MMSE 27 , CDR 0") == "Age 71 , MMSE"
    assert MedBlipTextProcessor(max_words=None)("a " * 300).count("a") == 300
    assert MedBlipTextProcessor()("w " * 300).count("w") == 256  # default max_words


def test_empty_and_invalid_input():
    processor = MedBlipTextProcessor()
    assert processor(" \n\t ") == ""
    with pytest.raises(TypeError, match="expects a str"):
        processor(float("nan"))  # a missing value from a pandas column
    with pytest.raises(ValueError, match="max_words"):
        MedBlipTextProcessor(max_words=0)
