"""Cohort builders: a small table in each cohort's real column layout + empty scan files in its real
naming layout (builders match by name only and never open images) → train/val/test JSONL + report.json.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dataset_builders import adni, aibl, miriad, nacc, oasis
from dataset_builders.authors_tsv import read_authors_tsv
from dataset_builders.splits import SplitOptions, assign_splits, balanced_test_sample
from lavis_medblip.annotations.schema import AnnotationRecord, read_annotations


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def touch(root: Path, relative: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def load(out: Path) -> dict[str, list[AnnotationRecord]]:
    return {split: list(read_annotations(out / f"{split}.jsonl")) for split in ("train", "val", "test")}


def everything(out: Path) -> list[AnnotationRecord]:
    return [record for records in load(out).values() for record in records]


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def assert_subject_wise(out: Path) -> None:
    subjects = {split: {record.subject_id for record in records} for split, records in load(out).items()}
    assert not subjects["train"] & subjects["val"]
    assert not subjects["train"] & subjects["test"]
    assert not subjects["val"] & subjects["test"]


ADNI_HEADER = ["RID", "PTID", "VISCODE", "EXAMDATE", "DX_bl", "DX", "AGE", "Years_bl", "PTGENDER", "PTEDUCAT",
               "MMSE", "CDRSB", "LDELTOTAL", "APOE4", "ADAS13", "FAQ"]


def loni_scan(root: Path, ptid: str, date: str, image_id: int, series: str = "MPRAGE") -> Path:
    """A file where an ADNI LONI download puts it (the date folder and the name both carry the date)."""
    compact = date.replace("-", "")
    return touch(root, f"ADNI/{ptid}/{series}/{date}_08_20_30.0/I{image_id}/"
                       f"ADNI_{ptid}_MR_{series}_br_raw_{compact}081530123_1_S{image_id}_I{image_id}.nii")


# ------------------------------------------------------------------------------------------------
# ADNI
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def adni_download(tmp_path: Path) -> tuple[Path, Path]:
    table = write_csv(tmp_path / "ADNIMERGE.csv", ADNI_HEADER, [
        [295, "002_S_0295", "bl", "2006-04-18", "CN", "CN", 84.8, 0, "Male", 18, 28, 0, 14, 1, 6.0, 0],
        [295, "002_S_0295", "m06", "2006-11-02", "CN", "CN", 84.8, 0.54, "Male", 18, "", 0.5, 13, 1, 8.0, 0],
        [3, "011_S_0003", "bl", "2005-09-12", "AD", "Dementia", 81.3, 0, "Female", 12, 20, 4.5, 1, 2, 31.0, 10],
        [4, "022_S_0004", "bl", "2005-11-08", "LMCI", "MCI", 67.5, 0, "Male", 10, 27, 1.0, 4, 0, 21.0, 2],
        [4, "022_S_0004", "m12", "2006-11-14", "LMCI", "MCI to Dementia", 67.5, 1.02, "Male", 10, 24, 3.0, 2, 0, 28.0, 6],
        [5, "033_S_0005", "bl", "2005-09-07", "EMCI", "Unsure", 73.7, 0, "Female", 16, 29, 0.5, 8, 0, 9.0, 0],
        [6, "044_S_0006", "bl", "2005-11-30", "CN", "CN", 70.0, 0, "Female", 14, 30, 0, 15, 0, 5.0, 0],
        [7, "055_S_0007", "bl", "someday", "CN", "CN", 70.0, 0, "Female", 14, 30, 0, 15, 0, 5.0, 0],
    ])
    scans = tmp_path / "download"
    loni_scan(scans, "002_S_0295", "2006-04-21", 13722)          # 3 days after EXAMDATE
    loni_scan(scans, "002_S_0295", "2006-04-21", 13723, "MPRAGE_Repeat")  # second scan of the same visit
    loni_scan(scans, "002_S_0295", "2006-11-01", 40966)
    loni_scan(scans, "011_S_0003", "2005-09-01", 32237)
    loni_scan(scans, "022_S_0004", "2005-11-08", 9127)
    loni_scan(scans, "022_S_0004", "2006-11-20", 35475)
    loni_scan(scans, "022_S_0004", "2008-01-10", 87654)          # no visit within 90 days
    loni_scan(scans, "033_S_0005", "2005-09-07", 11111)          # row with an unknown label
    loni_scan(scans, "099_S_9999", "2007-01-01", 22222)          # subject not in ADNIMERGE
    touch(scans, "ADNI/notes/localizer.nii")                      # no PTID in the name
    return table, scans


def test_adni_builds_matched_labelled_annotations(adni_download: tuple[Path, Path], tmp_path: Path) -> None:
    table, scans = adni_download
    out = tmp_path / "annotations"
    assert adni.main(["--table", str(table), "--scans", str(scans), "--out", str(out), "--seed", "1"]) == 0

    records = {(record.subject_id, record.visit): record for record in everything(out)}
    assert set(records) == {("002_S_0295", "bl"), ("002_S_0295", "m06"), ("011_S_0003", "bl"),
                            ("022_S_0004", "bl"), ("022_S_0004", "m12")}
    assert {key: record.label for key, record in records.items()} == {
        ("002_S_0295", "bl"): "NC", ("002_S_0295", "m06"): "NC", ("011_S_0003", "bl"): "AD",
        ("022_S_0004", "bl"): "MCI", ("022_S_0004", "m12"): "AD"}  # "MCI to Dementia" is the later diagnosis

    follow_up = records[("002_S_0295", "m06")]
    assert follow_up.site == "002" and follow_up.cohort == "ADNI"
    assert follow_up.ehr["age"] == pytest.approx(85.3)  # AGE at baseline + Years_bl
    assert follow_up.ehr["mmse"] is None
    assert follow_up.text == ("An 85.3-year-old male with 18 years of education. CDR-SB 0.5, "
                              "logical memory delayed recall 13, ADAS-13 8, FAQ 0, APOE4 allele count 1.")
    assert all("nan" not in record.text.lower() for record in records.values())
    # image paths are relative to the annotation folder and name the matched LONI file
    baseline = records[("002_S_0295", "bl")]
    assert (out / baseline.image).resolve().name.endswith("_I13722.nii")
    assert_subject_wise(out)

    found = report(out)
    assert found["counts"]["records"] == 5
    assert found["counts"]["unmatched_rows"] == 1 and "044_S_0006" in found["unmatched_rows"][0]["message"]
    orphans = {Path(item["where"]).name: item["message"] for item in found["orphan_scans"]}
    assert len(orphans) == 3
    assert "099_S_9999" in orphans["ADNI_099_S_9999_MR_MPRAGE_br_raw_20070101081530123_1_S22222_I22222.nii"]
    assert "days" in orphans["ADNI_022_S_0004_MR_MPRAGE_br_raw_20080110081530123_1_S87654_I87654.nii"]
    assert "localizer.nii" in orphans
    assert [item["code"] for item in found["unknown_labels"]] == ["Unsure"]
    assert found["counts"]["malformed_rows"] == 1 and "ADNIMERGE.csv:9" in found["malformed_rows"][0]["where"]
    assert found["counts"]["extra_scans"] == 1 and found["counts"]["scans_of_skipped_rows"] == 1


def test_adni_missing_column_names_column_and_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table = write_csv(tmp_path / "ADNIMERGE.csv", ["RID", "PTID", "EXAMDATE", "DX"], [[1, "002_S_0001", "2006-01-01", "CN"]])
    (tmp_path / "scans").mkdir()
    with pytest.raises(ValueError, match=r"ADNIMERGE\.csv: missing column\(s\) \['VISCODE'\]"):
        adni.build_adni(table, tmp_path / "scans", tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        adni.main(["--table", str(table), "--scans", str(tmp_path / "scans"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "ADNIMERGE.csv: missing column(s) ['VISCODE']" in capsys.readouterr().err


def test_adni_on_error_raise_stops_at_the_first_bad_row(adni_download: tuple[Path, Path], tmp_path: Path) -> None:
    table, scans = adni_download
    with pytest.raises(ValueError, match=r"ADNIMERGE\.csv:7: unknown diagnosis label 'Unsure'"):
        adni.build_adni(table, scans, tmp_path / "out", on_error="raise")


def synthetic_adni(tmp_path: Path, subjects_per_class: int) -> tuple[Path, Path]:
    """``subjects_per_class`` subjects per diagnosis, each with a baseline and a 12-month visit and scans."""
    rows, scans = [], tmp_path / "download"
    for class_index, dx in enumerate(("CN", "MCI", "Dementia")):
        for k in range(subjects_per_class):
            ptid = f"{class_index + 1:03d}_S_{k:04d}"
            for viscode, date in (("bl", "2010-01-15"), ("m12", "2011-01-20")):
                rows.append([k, ptid, viscode, date, dx, dx, 70 + k % 10, 0, "Female", 16, 27, 1, 10, 0, 12, 3])
                loni_scan(scans, ptid, date, 1000 * class_index + k)
    return write_csv(tmp_path / "ADNIMERGE.csv", ADNI_HEADER, rows), scans


def test_adni_balanced_test_set_is_seeded_and_subject_wise(tmp_path: Path) -> None:
    table, scans = synthetic_adni(tmp_path, subjects_per_class=8)
    argv = ["--table", str(table), "--scans", str(scans), "--test-per-class", "3", "--val-fraction", "0.25"]
    adni.main(argv + ["--out", str(tmp_path / "a"), "--seed", "7"])
    adni.main(argv + ["--out", str(tmp_path / "b"), "--seed", "7"])
    adni.main(argv + ["--out", str(tmp_path / "c"), "--seed", "8"])

    splits = load(tmp_path / "a")
    assert sorted(record.label for record in splits["test"]) == ["AD"] * 3 + ["MCI"] * 3 + ["NC"] * 3
    assert len({record.subject_id for record in splits["test"]}) == 9  # one visit per test subject
    # 25 % of the 15 remaining subjects, spread over the classes
    val_subjects = {record.subject_id: record.label for record in splits["val"]}
    assert len(val_subjects) == 4 and set(val_subjects.values()) == {"NC", "MCI", "AD"}
    assert_subject_wise(tmp_path / "a")
    assert report(tmp_path / "a")["counts"]["dropped_test_subject_visits"] == 9
    assert (tmp_path / "a" / "test.jsonl").read_text() == (tmp_path / "b" / "test.jsonl").read_text()
    assert (tmp_path / "a" / "test.jsonl").read_text() != (tmp_path / "c" / "test.jsonl").read_text()


def test_balanced_test_set_refuses_when_a_class_is_short(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    table, scans = synthetic_adni(tmp_path, subjects_per_class=2)
    with pytest.raises(SystemExit):
        adni.main(["--table", str(table), "--scans", str(scans), "--out", str(tmp_path / "out"),
                   "--test-per-class", "3"])
    assert "needs 3 subjects per class; too few in NC (2), MCI (2), AD (2)" in capsys.readouterr().err


def test_split_helpers_on_plain_records() -> None:
    records = [AnnotationRecord(image=f"{subject}_{visit}.nii", subject_id=subject, label=label, split="train")
               for subject, label in [(f"s{i}", ("NC", "MCI", "AD")[i % 3]) for i in range(30)] for visit in (1, 2)]
    test = balanced_test_sample(records, 4, seed=3)
    assert [record.label for record in test] == ["NC"] * 4 + ["MCI"] * 4 + ["AD"] * 4
    assert test == balanced_test_sample(records, 4, seed=3)
    kept = assign_splits(records, seed=0, val_fraction=0.2, test_fraction=0.2)
    assert len(kept) == 60
    by_subject: dict[str, set[str]] = {}
    for record in kept:
        by_subject.setdefault(record.subject_id, set()).add(record.split)
    assert all(len(splits) == 1 for splits in by_subject.values())
    assert sum(splits == {"test"} for splits in by_subject.values()) == 6  # 20 % of 30 subjects, per class 2


# ------------------------------------------------------------------------------------------------
# NACC
# ------------------------------------------------------------------------------------------------

NACC_HEADER = ["NACCID", "NACCADC", "NACCVNUM", "VISITMO", "VISITDAY", "VISITYR", "NACCAGE", "SEX", "EDUC",
               "NACCMMSE", "MOCATOTS", "CDRGLOB", "NACCUDSD"]


@pytest.fixture
def nacc_download(tmp_path: Path) -> tuple[Path, Path]:
    table = write_csv(tmp_path / "investigator_nacc57.csv", NACC_HEADER, [
        ["NACC000001", 186, 1, 3, 15, 2010, 72, 1, 16, 29, 88, 0, 1],
        ["NACC000001", 186, 2, 3, 20, 2011, 73, 1, 16, 88, -4, 0, 1],  # MMSE 88 = not assessed
        ["NACC000002", 229, 1, 6, 2, 2012, 80, 2, 99, -4, 22, 0.5, 2],  # EDUC 99 unknown; impaired-not-MCI
        ["NACC000003", 229, 1, 1, 10, 2014, 77, 2, 12, 24, 88, 0.5, 3],
        ["NACC000004", 186, 1, 9, 9, 2015, 81, 1, 20, 17, 88, 1, 4],
        ["NACC000005", 186, 1, 9, 9, 2015, 81, 1, 20, 17, 88, 1, 7],      # not a NACCUDSD code
        ["NACC000006", 186, 1, 2, 30, 2015, 81, 1, 20, 17, 88, 1, 1],     # February 30th
    ])
    scans = tmp_path / "mri"
    touch(scans, "NACC000001/NACC000001_20100401_T1.nii.gz")   # 17 days after visit 1
    touch(scans, "NACC000001/NACC000001_v2_T1.nii.gz")         # visit number token
    touch(scans, "NACC000002/NACC000002_20120610_T1.nii.gz")
    touch(scans, "NACC000003/NACC000003_20140110_T1.nii.gz")
    touch(scans, "NACC000005/NACC000005_20150909_T1.nii.gz")
    touch(scans, "NACC999999/NACC999999_20150909_T1.nii.gz")   # not in the UDS table
    return table, scans


def test_nacc_missing_codes_never_reach_the_text(nacc_download: tuple[Path, Path], tmp_path: Path) -> None:
    table, scans = nacc_download
    out = tmp_path / "nacc"
    result = nacc.build_nacc(table, scans, out, split=SplitOptions(all_test=True))
    records = {(record.subject_id, record.visit): record for record in result.records}
    assert {key: record.label for key, record in records.items()} == {
        ("NACC000001", "1"): "NC", ("NACC000001", "2"): "NC", ("NACC000002", "1"): "MCI", ("NACC000003", "1"): "MCI"}
    second = records[("NACC000001", "2")]
    assert second.ehr["mmse"] is None and second.ehr["moca"] is None
    assert second.text == "A 73-year-old male with 16 years of education. CDR 0 (no dementia)."
    impaired = records[("NACC000002", "1")]
    assert impaired.ehr["education_years"] is None and impaired.site == "229" and impaired.ehr["moca"] == 22
    assert all(code not in record.text for record in records.values() for code in ("88", "99", "-4", "nan"))

    found = report(out)
    assert [item["code"] for item in found["unknown_labels"]] == ["7"]
    assert "NACC000004" in found["unmatched_rows"][0]["message"]
    assert "NACC999999" in found["orphan_scans"][0]["message"]
    assert found["counts"]["malformed_rows"] == 1  # the 30th of February


def test_nacc_impaired_not_mci_can_be_dropped(nacc_download: tuple[Path, Path], tmp_path: Path) -> None:
    table, scans = nacc_download
    out = tmp_path / "nacc"
    nacc.main(["--table", str(table), "--scans", str(scans), "--out", str(out), "--impaired-not-mci", "drop",
               "--all-test"])
    assert "NACC000002" not in {record.subject_id for record in everything(out)}
    assert report(out)["counts"]["excluded_labels"] == 1


# ------------------------------------------------------------------------------------------------
# OASIS
# ------------------------------------------------------------------------------------------------

OASIS2_HEADER = ["Subject ID", "MRI ID", "Group", "Visit", "MR Delay", "M/F", "Hand", "Age", "EDUC", "SES", "MMSE",
                 "CDR", "eTIV", "nWBV", "ASF"]


def test_oasis2_is_demented_vs_not_with_converters_by_cdr(tmp_path: Path) -> None:
    table = write_csv(tmp_path / "oasis_longitudinal.csv", OASIS2_HEADER, [
        ["OAS2_0001", "OAS2_0001_MR1", "Nondemented", 1, 0, "M", "R", 87, 14, 2, 27, 0, 1987, 0.696, 0.883],
        ["OAS2_0001", "OAS2_0001_MR2", "Nondemented", 2, 457, "M", "R", 88, 14, 2, 30, 0, 2004, 0.681, 0.876],
        ["OAS2_0002", "OAS2_0002_MR1", "Demented", 1, 0, "M", "R", 75, 12, "", 23, 0.5, 1678, 0.736, 1.046],
        ["OAS2_0020", "OAS2_0020_MR1", "Converted", 1, 0, "M", "R", 80, 20, 1, 29, 0, 1587, 0.693, 1.106],
        ["OAS2_0020", "OAS2_0020_MR2", "Converted", 2, 756, "M", "R", 82, 20, 1, 28, 0.5, 1606, 0.677, 1.093],
        ["OAS2_0030", "OAS2_0030_MR1", "Nondemented", 1, 0, "F", "R", 60, 18, 1, 30, 0, 1400, 0.75, 1.2],
    ])
    scans = tmp_path / "OASIS2"
    for session in ("OAS2_0001_MR1", "OAS2_0001_MR2", "OAS2_0002_MR1", "OAS2_0020_MR1", "OAS2_0020_MR2"):
        touch(scans, f"{session}/RAW/mpr-1.nifti.img")
        touch(scans, f"{session}/RAW/mpr-1.nifti.hdr")  # the Analyze header half is not a second scan
        touch(scans, f"{session}/RAW/mpr-2.nifti.img")
    out = tmp_path / "oasis2"
    oasis.main(["--table", str(table), "--scans", str(scans), "--out", str(out), "--seed", "0"])

    records = {(record.subject_id, record.visit): record for record in everything(out)}
    assert {key: record.label for key, record in records.items()} == {
        ("OAS2_0001", "MR1"): "NC", ("OAS2_0001", "MR2"): "NC", ("OAS2_0002", "MR1"): "AD",
        ("OAS2_0020", "MR1"): "NC", ("OAS2_0020", "MR2"): "AD"}
    assert all(record.image.endswith("mpr-1.nifti.img") and record.cohort == "OASIS-2" for record in records.values())
    assert records[("OAS2_0002", "MR1")].text == (
        "A 75-year-old male with 12 years of education. "
        "MMSE 23/30 (7 points below the maximum, mild dementia range), CDR 0.5 (very mild dementia).")
    found = report(out)
    assert found["counts"]["extra_scans"] == 5 and found["counts"]["unmatched_rows"] == 1
    assert found["options"]["classes"] == ["NC", "AD"]
    assert_subject_wise(out)


def test_oasis1_is_unlabelled_pretraining_data(tmp_path: Path) -> None:
    table = write_csv(tmp_path / "oasis_cross-sectional.csv",
                      ["ID", "M/F", "Hand", "Age", "Educ", "SES", "MMSE", "CDR", "eTIV", "nWBV", "ASF", "Delay"], [
                          ["OAS1_0001_MR1", "F", "R", 74, 2, 3, 29, 0, 1344, 0.743, 1.306, "N/A"],
                          ["OAS1_0002_MR1", "F", "R", 55, 4, 1, 29, 0, 1147, 0.81, 1.531, "N/A"],
                          ["OAS1_0003_MR1", "F", "R", 73, 4, 3, 27, 0.5, 1454, 0.708, 1.207, "N/A"],
                          ["OAS1_0004_MR1", "M", "R", 28, "", "", "", "", 1588, 0.803, 1.105, "N/A"],
                      ])
    scans = tmp_path / "OASIS1"
    for number in range(1, 5):
        session = f"OAS1_{number:04d}_MR1"
        touch(scans, f"disc1/{session}/RAW/{session}_mpr-1_anon.img")
        touch(scans, f"disc1/{session}/PROCESSED/MPRAGE/T88_111/{session}_mpr_n4_anon_111_t88_gfc.img")
    out = tmp_path / "oasis1"
    result = oasis.build_oasis(table, scans, out, scan_glob="**/RAW/*mpr-1*.img")
    assert result.counts == {"train": 4 - result.counts["val"], "val": result.counts["val"], "test": 0}
    assert all(record.label is None and "_mpr-1_anon.img" in record.image for record in result.records)
    young = next(record for record in result.records if record.subject_id == "OAS1_0004")
    assert young.text == "A 28-year-old female." or young.text == "A 28-year-old male."
    assert young.ehr["education_level"] is None
    assert next(r for r in result.records if r.subject_id == "OAS1_0003").ehr["education_level"] == 4
    assert report(out)["counts"].get("extra_scans", 0) == 0
    with pytest.raises(ValueError, match="OASIS-1 has no diagnosis"):
        oasis.build_oasis(table, scans, out, split=SplitOptions(test_per_class=1))


# ------------------------------------------------------------------------------------------------
# AIBL
# ------------------------------------------------------------------------------------------------

def aibl_tables(folder: Path, *, mri3meta_date_column: str = "EXAMDATE") -> Path:
    write_csv(folder / "aibl_ptdemog_01-Jun-2018.csv", ["RID", "SITEID", "VISCODE", "PTGENDER", "PTDOB"], [
        [1, 1, "bl", 2, "/1931"], [2, 2, "bl", 1, "/1940"], [3, 1, "bl", 1, "/1950"]])
    write_csv(folder / "aibl_pdxconv_01-Jun-2018.csv", ["RID", "SITEID", "VISCODE", "EXAMDATE", "DXCURREN"], [
        [1, 1, "bl", -4, 1], [1, 1, "m18", -4, 2], [2, 2, "bl", -4, 3], [3, 1, "bl", -4, -4]])
    write_csv(folder / "aibl_mmse_01-Jun-2018.csv", ["RID", "SITEID", "VISCODE", "EXAMDATE", "MMSCORE"], [
        [1, 1, "bl", -4, 29], [1, 1, "m18", -4, -4], [2, 2, "bl", -4, 19]])
    write_csv(folder / "aibl_cdr_01-Jun-2018.csv", ["RID", "SITEID", "VISCODE", "EXAMDATE", "CDGLOBAL"], [
        [1, 1, "bl", -4, 0], [1, 1, "m18", -4, 0.5], [2, 2, "bl", -4, 1]])
    write_csv(folder / "aibl_neurobat_01-Jun-2018.csv", ["RID", "SITEID", "VISCODE", "EXAMDATE", "LDELTOTAL"], [
        [1, 1, "bl", -4, 12], [2, 2, "bl", -4, -1]])
    write_csv(folder / "aibl_mri3meta_01-Jun-2018.csv", ["RID", "SITEID", "VISCODE", mri3meta_date_column], [
        [1, 1, "bl", "08/14/2008"], [1, 1, "m18", "02/20/2010"], [2, 2, "bl", "09/01/2008"], [3, 1, "bl", "10/01/2008"]])
    return folder


def test_aibl_merges_the_tables_and_is_all_test(tmp_path: Path) -> None:
    tables = aibl_tables(tmp_path / "tables")
    scans = tmp_path / "download"
    for rid, date, image in ((1, "2008-08-14", 101), (1, "2010-02-22", 102), (2, "2008-09-03", 103), (3, "2008-10-01", 104)):
        touch(scans, f"AIBL/{rid}/MPRAGE/{date}_11_21_43.0/I{image}/"
                     f"AIBL_{rid}_MR_MPRAGE_br_raw_{date.replace('-', '')}112143_1_S{image}_I{image}.nii")
    out = tmp_path / "aibl"
    assert aibl.main(["--table", str(tables), "--scans", str(scans), "--out", str(out)]) == 0

    splits = load(out)
    assert not splits["train"] and not splits["val"]  # zero-shot cohort
    records = {(record.subject_id, record.visit): record for record in splits["test"]}
    assert {key: record.label for key, record in records.items()} == {("1", "bl"): "NC", ("1", "m18"): "MCI",
                                                                      ("2", "bl"): "AD"}
    assert records[("1", "bl")].text == (
        "A 77.1-year-old female. MMSE 29/30 (1 point below the maximum, questionable dementia range), "
        "CDR 0 (no dementia), "
        "logical memory delayed recall 12.")
    assert records[("1", "m18")].text == "A 78.6-year-old female. CDR 0.5 (very mild dementia)."  # MMSE -4 is missing
    assert records[("2", "bl")].ehr["logical_memory_delayed"] is None and records[("2", "bl")].site == "2"
    found = report(out)
    assert [item["code"] for item in found["unknown_labels"]] == ["-4"]
    assert found["counts"]["scans_of_skipped_rows"] == 1


def test_aibl_missing_column_names_the_table(tmp_path: Path) -> None:
    tables = aibl_tables(tmp_path / "tables", mri3meta_date_column="SCANDATE")
    (tmp_path / "scans").mkdir()
    with pytest.raises(ValueError, match=r"aibl_mri3meta_01-Jun-2018\.csv: missing column\(s\) \['EXAMDATE'\]"):
        aibl.build_aibl(tables, tmp_path / "scans", tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# MIRIAD
# ------------------------------------------------------------------------------------------------

def test_miriad_labels_from_names_with_optional_demographics(tmp_path: Path) -> None:
    scans = tmp_path / "miriad"
    for name in ("miriad_188_AD_M_01_MR_1.nii", "miriad_188_AD_M_01_MR_2.nii", "miriad_188_AD_M_02_MR_1.nii",
                 "miriad_189_HC_F_01_MR_1.nii", "miriad_190_HC_M_01_MR_1.nii"):
        touch(scans, f"{name[:10]}/{name}")
    demographics = write_csv(tmp_path / "miriad_demographics.csv", ["Subject", "Visit", "Age", "MMSE"], [
        ["miriad_188", 1, 69.5, 18], ["miriad_188", 2, 69.6, ""], ["miriad_189", 1, 71, 30], ["miriad_191", 1, 60, 29]])
    out = tmp_path / "out"
    miriad.main(["--scans", str(scans), "--table", str(demographics), "--out", str(out)])

    splits = load(out)
    assert not splits["train"] and not splits["val"]
    records = {(record.subject_id, record.visit): record for record in splits["test"]}
    assert {key: record.label for key, record in records.items()} == {
        ("188", "1"): "AD", ("188", "2"): "AD", ("189", "1"): "NC", ("190", "1"): "NC"}
    assert records[("188", "1")].text == (
        "A 69.5-year-old male. MMSE 18/30 (12 points below the maximum, moderate dementia range).")
    assert records[("188", "1")].image.endswith("MR_1.nii")
    assert records[("190", "1")].text == "A male."
    found = report(out)
    assert found["counts"]["extra_scans"] == 1
    assert "miriad_190_HC_M_01_MR_1.nii" in found["scans_without_row"][0]["where"]
    assert "subject 191" in found["unmatched_rows"][0]["message"]


# ------------------------------------------------------------------------------------------------
# The authors' lists
# ------------------------------------------------------------------------------------------------

def test_authors_tsv_reader(tmp_path: Path) -> None:
    lists = tmp_path / "ADNI-test.csv"  # the original code's local_data/*.csv are tab-separated
    lists.write_text(
        "/data/ADNI/002_S_0295_bl.nii.gz\tA 84-year-old male, MMSE 28. The diagnosis is CN.\n"
        "/data/ADNI/011_S_0003_bl.nii.gz\tA 81-year-old female, MMSE 20. The diagnosis is Dementia.\n"
        "\n"
        "/data/ADNI/022_S_0004_m12.nii.gz\tAn image of the brain.\n")
    records = read_authors_tsv(lists, split="test", cohort="ADNI", subject_pattern=r"\d{3}_S_\d{4}")
    assert [(record.subject_id, record.label) for record in records] == [
        ("002_S_0295", "NC"), ("011_S_0003", "AD"), ("022_S_0004", None)]
    assert records[0].text == "A 84-year-old male, MMSE 28."  # the answer is not left in the prompt
    assert records[0].image == "/data/ADNI/002_S_0295_bl.nii.gz" and records[0].split == "test"

    broken = tmp_path / "broken.csv"
    broken.write_text("/data/x.nii\tSomething. The diagnosis is flu.\n")
    with pytest.raises(ValueError, match=r"broken\.csv:1: unknown diagnosis label 'flu'"):
        read_authors_tsv(broken)
