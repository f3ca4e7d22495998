"""BIDS input: a small BIDS tree written here, laid out as Clinica's converters write it (participants.tsv,
one sub-*_sessions.tsv per subject with Clinica's columns, phenotype/), → the annotation schema, then the
registered ``bids`` builder reads the folder back.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from omegaconf import OmegaConf

from dataset_builders import bids
from lavis_medblip.annotations.schema import read_annotations


def write_tsv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(map(str, line)) for line in [header, *rows]) + "\n")
    return path


def write_t1w(root: Path, relative: str) -> Path:
    """A real (tiny) NIfTI, so the registered builder's dataset can load it."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = np.random.default_rng(len(relative)).random((18, 18, 18)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


@pytest.fixture
def clinica_bids(tmp_path: Path) -> Path:
    """Six subjects as ``clinica convert adni-to-bids`` writes them (two sessions each for three of them)."""
    root = tmp_path / "ADNI_BIDS"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "ADNI", "BIDSVersion": "1.8.0"}))
    write_tsv(root / "participants.tsv", ["participant_id", "alternative_id_1", "sex", "education", "site"], [
        ["sub-ADNI002S0295", "002_S_0295", "M", 18, "002"],
        ["sub-ADNI011S0003", "011_S_0003", "F", 12, "011"],
        ["sub-ADNI022S0004", "022_S_0004", "M", 10, "022"],
        ["sub-ADNI033S0005", "033_S_0005", "F", 16, "033"],
        ["sub-ADNI044S0006", "044_S_0006", "F", 14, "044"],
        ["sub-ADNI055S0007", "055_S_0007", "M", "n/a", "055"],
    ])
    sessions = {
        "sub-ADNI002S0295": [["ses-M000", 84.8, 28, 0, "CN"], ["ses-M006", 85.3, 29, 0, "CN"]],
        "sub-ADNI011S0003": [["ses-M000", 81.3, 20, 1, "AD"], ["ses-M012", 82.3, 18, 2, "AD"]],
        "sub-ADNI022S0004": [["ses-M000", 67.5, 27, 0.5, "MCI"], ["ses-M012", 68.5, 24, 1, "AD"]],
        "sub-ADNI033S0005": [["ses-M000", 73.7, 29, 0, "SMC"]],
        "sub-ADNI044S0006": [["ses-M000", 70.1, "n/a", 0.5, "MCI"], ["ses-M024", 72.1, 25, 0.5, "MCI"]],
        "sub-ADNI055S0007": [["ses-M000", 77.0, 26, 0.5, "Unsure"]],
    }
    for subject, rows in sessions.items():
        write_tsv(root / subject / f"{subject}_sessions.tsv", ["session_id", "age", "MMS", "cdr_global", "diagnosis"],
                  rows)
        for session, *_ in rows:
            if (subject, session) != ("sub-ADNI044S0006", "ses-M024"):  # a session without a scan
                write_t1w(root, f"{subject}/{session}/anat/{subject}_{session}_T1w.nii.gz")
    write_t1w(root, "sub-ADNI022S0004/ses-M012/anat/sub-ADNI022S0004_ses-M012_run-02_T1w.nii.gz")
    write_t1w(root, "sub-ADNI999S9999/ses-M000/anat/sub-ADNI999S9999_ses-M000_T1w.nii.gz")  # in no table
    write_t1w(root, "sub-ADNI002S0295/ses-M000/anat/sub-ADNI002S0295_ses-M000_FLAIR.nii.gz")  # not a T1w
    write_tsv(root / "phenotype" / "apoe.tsv", ["participant_id", "apoe4"], [["sub-ADNI011S0003", 2]])
    return root


def records(out: Path) -> list:
    return [record for split in ("train", "val", "test") for record in read_annotations(out / f"{split}.jsonl")]


def test_a_clinica_bids_tree_becomes_annotations_with_its_ehr_and_a_report(clinica_bids, tmp_path):
    out = tmp_path / "annotations"
    assert bids.main(["--bids-dir", str(clinica_bids), "--out", str(out), "--seed", "0"]) == 0
    found = {(record.subject_id, record.visit, Path(record.image).name): record for record in records(out)}
    ad = found[("sub-ADNI011S0003", "ses-M012", "sub-ADNI011S0003_ses-M012_T1w.nii.gz")]
    assert ad.label == "AD" and ad.site == "011" and ad.cohort == "ADNI_BIDS"
    assert ad.ehr == {"age": 82.3, "sex": "F", "education_years": 12, "mmse": 18, "cdr_global": 2, "cdr_sb": None,
                      "apoe4": 2, "adas13": None, "faq": None}
    assert ad.text == ("An 82.3-year-old female with 12 years of education. "
                       "MMSE 18/30 (12 points below the maximum, moderate dementia range), "
                       "CDR 2 (moderate dementia), APOE4 allele count 2.")
    assert (out / ad.image).resolve() == (clinica_bids / "sub-ADNI011S0003/ses-M012/anat"
                                          / "sub-ADNI011S0003_ses-M012_T1w.nii.gz").resolve()
    # a session's diagnosis is the visit's: the converter is MCI at M000 and AD at M012, both runs kept
    assert found[("sub-ADNI022S0004", "ses-M000", "sub-ADNI022S0004_ses-M000_T1w.nii.gz")].label == "MCI"
    assert {name for subject, visit, name in found if visit == "ses-M012" and subject == "sub-ADNI022S0004"} == {
        "sub-ADNI022S0004_ses-M012_T1w.nii.gz", "sub-ADNI022S0004_ses-M012_run-02_T1w.nii.gz"}
    assert found[("sub-ADNI033S0005", "ses-M000", "sub-ADNI033S0005_ses-M000_T1w.nii.gz")].label == "NC"  # SMC
    assert found[("sub-ADNI044S0006", "ses-M000", "sub-ADNI044S0006_ses-M000_T1w.nii.gz")].ehr["mmse"] is None
    assert len(found) == 9 and not any("FLAIR" in name for *_, name in found)

    report = json.loads((out / "report.json").read_text())
    assert [item["where"] for item in report["unknown_labels"]] == [
        f"{clinica_bids}/sub-ADNI055S0007/sub-ADNI055S0007_sessions.tsv:2"]
    assert [item["where"] for item in report["unmatched_rows"]] == [
        f"{clinica_bids}/sub-ADNI044S0006/sub-ADNI044S0006_sessions.tsv:3"]
    assert [Path(item["where"]).name for item in report["orphan_scans"]] == ["sub-ADNI999S9999_ses-M000_T1w.nii.gz"]
    subjects = {split: {r.subject_id for r in read_annotations(out / f"{split}.jsonl")} for split in ("train", "val", "test")}
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])


def test_another_diagnosis_column_and_a_code_map(clinica_bids, tmp_path):
    write_tsv(clinica_bids / "participants.tsv", ["participant_id", "sex", "dx_group"],
              [["sub-ADNI002S0295", "M", "Control"], ["sub-ADNI011S0003", "F", "Patient"]])
    result = bids.build_bids(clinica_bids, tmp_path / "out", diagnosis_column="dx_group",
                             label_map="NC=Control,AD=Patient", all_scans_per_visit=False)
    labels = {(record.subject_id, record.visit): record.label for record in result.records}
    assert labels == {("sub-ADNI002S0295", "ses-M000"): "NC", ("sub-ADNI002S0295", "ses-M006"): "NC",
                      ("sub-ADNI011S0003", "ses-M000"): "AD", ("sub-ADNI011S0003", "ses-M012"): "AD"}


def test_a_dataset_without_sessions_has_one_visit_per_subject(tmp_path):
    root = tmp_path / "ds"
    (root).mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.8.0"}))
    write_tsv(root / "participants.tsv", ["participant_id", "age", "sex", "group"],
              [["sub-01", 70, "female", "AD"], ["sub-02", 65, "male", "control"]])
    write_t1w(root, "sub-01/anat/sub-01_T1w.nii")
    write_t1w(root, "sub-02/anat/sub-02_T1w.nii.gz")
    result = bids.build_bids(root, tmp_path / "out", label_map=None)
    assert sorted((r.subject_id, r.visit, r.label, r.ehr["sex"]) for r in result.records) == [
        ("sub-01", "n/a", "AD", "F"), ("sub-02", "n/a", "NC", "M")]


def test_bad_input_is_a_one_line_error_naming_the_file(clinica_bids, tmp_path, capsys):
    write_tsv(clinica_bids / "participants.tsv", ["participant_id", "sex"], [["sub-ADNI002S0295", "M"]])
    for subject in clinica_bids.glob("sub-*/sub-*_sessions.tsv"):
        subject.unlink()
    with pytest.raises(SystemExit) as stopped:
        bids.main(["--bids-dir", str(clinica_bids), "--out", str(tmp_path / "out")])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "no diagnosis column (diagnosis or dx" in error and str(clinica_bids / "participants.tsv") in error
    assert "--unlabelled" in error
    unlabelled = bids.build_bids(clinica_bids, tmp_path / "pairs", unlabelled=True)
    assert {record.label for record in unlabelled.records} == {None} and len(unlabelled.records) == 2
    with pytest.raises(ValueError, match=r"not a BIDS dataset \(no dataset_description.json\)"):
        bids.build_bids(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match=r"--map item 'X=CN' is not CLASS=CODE"):
        bids.build_bids(clinica_bids, tmp_path / "out", label_map="X=CN")


def test_the_registered_bids_builder_reads_the_folder_named_in_yaml(clinica_bids, tmp_path):
    from lavis.common.registry import registry

    out = tmp_path / "annotations"
    bids.build_bids(clinica_bids, out, split=bids.SplitOptions(val_fraction=0.2, test_fraction=0.2))
    builder_cls = registry.get_builder_class("bids")
    config = OmegaConf.load(builder_cls.default_config_path()).datasets.bids
    config.build_info.dir = str(out)
    config.build_info.splits = ["train", "test"]
    config.vis_processor = {"train": {"image_size": 32}, "eval": {"image_size": 32}}
    datasets = builder_cls(config).build_datasets()
    assert sorted(datasets) == ["test", "train"]
    assert len(datasets["train"]) == len(list(read_annotations(out / "train.jsonl")))
    sample = datasets["train"][0]
    assert tuple(sample["image"].shape) == (1, 32, 32, 32) and sample["subject_id"].startswith("sub-ADNI")
