"""The EHR sentence: MMSE and global CDR are written with their published dementia stage, the MMSE with its
distance from the maximum too (annotations/ehr.py)."""
import math

import pytest

from lavis_medblip.annotations.ehr import describe_ehr, describe_mmse, mmse_stage


@pytest.mark.parametrize("score, stage", [
    (30, "no dementia"), (29, "questionable dementia"), (26, "questionable dementia"), (25, "mild dementia"),
    (21, "mild dementia"), (20, "moderate dementia"), (11, "moderate dementia"), (10, "severe dementia"),
    (0, "severe dementia"), (25.5, "mild dementia"), (31, None), (-1.5, None)])
def test_mmse_stages_are_perneczky_2006s_ranges(score, stage):
    assert mmse_stage(score) == stage


def test_the_sentence_keeps_each_number_and_adds_its_stage():
    assert describe_ehr({"age": 75, "sex": "F", "education_years": 12, "mmse": 24, "cdr_global": 0.5}) == (
        "A 75-year-old female with 12 years of education. "
        "MMSE 24/30 (6 points below the maximum, mild dementia range), CDR 0.5 (very mild dementia).")
    assert describe_ehr({"mmse": 30, "cdr_global": 0}) == (
        "A subject. MMSE 30/30 (the maximum, no dementia range), CDR 0 (no dementia).")
    assert describe_ehr({"mmse": 12, "cdr_global": 3.0}) == (
        "A subject. MMSE 12/30 (18 points below the maximum, moderate dementia range), CDR 3 (severe dementia).")


@pytest.mark.parametrize("score, text", [
    (29, "MMSE 29/30 (1 point below the maximum, questionable dementia range)"),
    (27.5, "MMSE 27.5/30 (2.5 points below the maximum, questionable dementia range)"),
    (0, "MMSE 0/30 (30 points below the maximum, severe dementia range)")])
def test_the_mmse_also_says_how_far_below_the_maximum_it_is(score, text):
    assert describe_mmse(score) == text


def test_values_without_a_stage_are_written_as_they_are_and_missing_ones_left_out():
    assert describe_ehr({"mmse": 35, "cdr_global": 1.5}) == "A subject. MMSE 35, CDR 1.5."
    assert describe_ehr({"sex": "M", "mmse": math.nan, "cdr_global": None}) == "A male."
    assert describe_ehr({"age": 70, "cdr_sb": 2.5, "apoe4": 1}) == "A 70-year-old subject. CDR-SB 2.5, APOE4 allele count 1."
