"""The registered ``medblip_text`` processor: clinical text keeps its digits, case and punctuation, and each MMSE /
CDR value gets the stage words the cohort builders write."""
from __future__ import annotations

import itertools

import pytest
from omegaconf import OmegaConf

import lavis_medblip.processors  # noqa: F401  (registers the processors)
from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor
from lavis_medblip.annotations.ehr import describe_ehr
from lavis_medblip.processors.text import MedBlipTextProcessor


def test_registered_as_a_lavis_processor():
    processor_class = registry.get_processor_class("medblip_text")
    assert processor_class is MedBlipTextProcessor and issubclass(processor_class, BaseProcessor)


def test_ehr_text_survives_unchanged_apart_from_whitespace_and_the_score_stages():
    ehr = "  Female, 74 y.\n\tMMSE 24, CDR 0.5.  APOE4: 1 allele;\u00a0dx = MCI (amnestic)?  "
    assert MedBlipTextProcessor.from_config(None)(ehr) == (
        "Female, 74 y. MMSE 24 (6 points below the maximum, mild dementia range), CDR 0.5 (very mild dementia). "
        "APOE4: 1 allele; dx = MCI (amnestic)?")
    without_stages = MedBlipTextProcessor.from_config(OmegaConf.create({"score_stages": False}))
    assert without_stages(ehr) == "Female, 74 y. MMSE 24, CDR 0.5. APOE4: 1 allele; dx = MCI (amnestic)?"


@pytest.mark.parametrize("written_by_someone_else, as_the_model_reads_it", [
    ("Age: 71.8; Sex: M; MMSE: 25; CDR: 0.",
     "Age: 71.8; Sex: M; MMSE: 25 (5 points below the maximum, mild dementia range); CDR: 0 (no dementia)."),
    ("The Mini-Mental State Examination score was 30 out of 30 and the global Clinical Dementia Rating was 0.5.",
     "The Mini-Mental State Examination score was 30 out of 30 (the maximum, no dementia range) and the global "
     "Clinical Dementia Rating was 0.5 (very mild dementia)."),
    ("72 y/o woman. MMSE=18/30, CDR-SB 4.5, CDR global 1.",
     "72 y/o woman. MMSE=18/30 (12 points below the maximum, moderate dementia range), CDR-SB 4.5, CDR global 1 "
     "(mild dementia)."),
])
def test_scores_in_other_phrasings_get_the_stage_words_the_builders_write(written_by_someone_else,
                                                                          as_the_model_reads_it):
    assert MedBlipTextProcessor()(written_by_someone_else) == as_the_model_reads_it


@pytest.mark.parametrize("left_alone", [
    "MMSE not done, age 74, CDR pending.",  # no value right after the name
    "MMSE at 2 years: 24.",                 # a number that is not the score
    "MMSE 24 (done at home), MMSE 35, MMSE -1, CDR 1.5.",  # the writer's note; no stage for these values
])
def test_values_it_cannot_be_sure_of_are_left_as_they_are(left_alone):
    assert MedBlipTextProcessor()(left_alone) == left_alone


def test_the_cohort_builders_sentences_are_left_as_they_are():
    values = {"mmse": [None, 0, 10.5, 21, 26, 29, 30, 31], "cdr_global": [None, 0, 0.5, 1, 2, 3, 1.5]}
    for mmse, cdr in itertools.product(*values.values()):
        sentence = describe_ehr({"age": 74, "sex": "F", "mmse": mmse, "cdr_global": cdr, "cdr_sb": 2.5})
        assert MedBlipTextProcessor()(sentence) == sentence


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
    with pytest.raises(TypeError, match="score_stages must be true or false"):
        MedBlipTextProcessor(score_stages="false")
