"""The inference CLI ``python -m lavis_medblip.predict`` on the real ICBM-2009c brain, with the ``tiny`` model."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
from lavis.models import load_preprocess
from omegaconf import OmegaConf

from lavis_medblip.annotations.schema import CLASS_ANSWERS
from lavis_medblip.assets import ICBM_T1
from lavis_medblip.cli.predict import main
from lavis_medblip.inference import find_scans
from lavis_medblip.models import MedBLIP

EHR = "A 75-year-old female with 12 years of education. MMSE 24, CDR 0.5."


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """A folder with the ICBM T1, a 2 mm copy in a subfolder, and a file that is not a NIfTI."""
    folder = tmp_path_factory.mktemp("scans")
    (folder / "icbm_t1.nii.gz").write_bytes(ICBM_T1.read_bytes())
    image = nib.load(ICBM_T1)
    downsampled = np.asanyarray(image.dataobj)[::2, ::2, ::2]
    affine = image.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    (folder / "sub-02").mkdir()
    nib.save(nib.Nifti1Image(downsampled, affine), folder / "sub-02" / "t1_2mm.nii.gz")
    (folder / "corrupt.nii.gz").write_bytes(b"this is not a NIfTI file")
    (folder / "notes.txt").write_text("not a scan: ignored")
    return folder


def cli(checkpoint: Path, *arguments: str) -> list[str]:
    return ["--model-type", "tiny", "--checkpoint", str(checkpoint), *arguments]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_one_scan_prints_diagnosis_and_three_probabilities(checkpoint, capsys):
    assert main(cli(checkpoint, "--image", str(ICBM_T1), "--text", EHR)) == 0
    printed = capsys.readouterr().out
    diagnosis = next(line for line in printed.splitlines() if line.startswith("diagnosis: "))
    assert any(diagnosis == f"diagnosis: {code} ({answer})" for code, answer in CLASS_ANSWERS.items())
    probabilities = {line.split()[0]: float(line.split()[-1]) for line in printed.splitlines() if line.startswith("  ")}
    assert list(probabilities) == ["NC", "MCI", "AD"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-3)
    assert diagnosis.split()[1] == max(probabilities, key=probabilities.get)


def test_probabilities_are_those_of_predict_answers_on_the_processed_volume(checkpoint, tmp_path):
    results = tmp_path / "results.csv"
    main(cli(checkpoint, "--image", str(ICBM_T1), "--text", EHR, "--output", str(results)))
    (row,) = read_rows(results)

    config = OmegaConf.load(MedBLIP.default_config_path("tiny"))
    model = MedBLIP.from_config(config.model).eval()
    model.load_checkpoint(str(checkpoint))
    vis_processors, txt_processors = load_preprocess(config.preprocess)
    samples = {"image": vis_processors["eval"](str(ICBM_T1))[None], "text_input": [txt_processors["eval"](EHR)]}
    ranking = model.predict_answers(samples, list(CLASS_ANSWERS.values()))

    from_cli = [float(row[f"p_{code}"]) for code in CLASS_ANSWERS]
    np.testing.assert_allclose(from_cli, ranking.probs[0].tolist(), atol=1e-6)
    assert row["answer"] == ranking.predictions[0]


def test_report_writes_png_with_slices_and_probabilities(checkpoint, tmp_path, capsys):
    report = tmp_path / "report.png"
    main(cli(checkpoint, "--image", str(ICBM_T1), "--text", EHR, "--report", str(report)))
    assert f"report: {report}" in capsys.readouterr().out
    height, width, channels = matplotlib.image.imread(report).shape
    assert 300 <= height <= 500 and 1200 <= width <= 1600 and channels in (3, 4)  # 13 x 3.4 in at 110 dpi


def test_explain_adds_generated_text(checkpoint, capsys):
    main(cli(checkpoint, "--image", str(ICBM_T1), "--text", EHR, "--explain", "--max-new-tokens", "4"))
    assert any(line.startswith("explanation: ") for line in capsys.readouterr().out.splitlines())


def test_binary_classes_rank_two_answers(checkpoint, capsys):
    main(cli(checkpoint, "--image", str(ICBM_T1), "--text", EHR, "--classes", "NC", "AD"))
    probabilities = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(probabilities) == 2 and sum(probabilities) == pytest.approx(1.0, abs=1e-3)


def test_folder_gives_one_row_per_scan_and_skips_the_unreadable_one(checkpoint, scans, tmp_path, capsys):
    results = tmp_path / "results.csv"
    arguments = cli(checkpoint, "--image", str(scans), "--text", EHR, "--output", str(results), "--batch-size", "2")
    assert main(arguments) == 0
    rows = read_rows(results)
    assert [row["id"] for row in rows] == ["corrupt", "icbm_t1", "sub-02/t1_2mm"]  # sorted; notes.txt ignored
    corrupt, *diagnosed = rows
    assert "corrupt.nii.gz" in corrupt["error"] and corrupt["prediction"] == ""
    for row in diagnosed:
        assert row["error"] == "" and row["prediction"] in CLASS_ANSWERS
        assert row["answer"] == CLASS_ANSWERS[row["prediction"]]
        assert sum(float(row[f"p_{code}"]) for code in CLASS_ANSWERS) == pytest.approx(1.0, abs=1e-4)
    assert "2 of 3 scans diagnosed" in capsys.readouterr().err


def test_reading_in_worker_processes_gives_the_same_rows_as_reading_in_process(checkpoint, scans, tmp_path):
    rows = {}
    for workers in ("0", "2"):
        results = tmp_path / f"workers_{workers}.csv"
        assert main(cli(checkpoint, "--image", str(scans), "--text", EHR, "--output", str(results),
                        "--batch-size", "1", "--workers", workers)) == 0
        rows[workers] = read_rows(results)
    assert rows["2"] == rows["0"]  # the same order, probabilities and errors (the corrupt scan's comes back too)
    assert "corrupt.nii.gz" in rows["2"][0]["error"]


def test_cache_dir_keeps_preprocessed_volumes_for_the_next_run(checkpoint, scans, tmp_path):
    cache = tmp_path / "volume_cache"
    arguments = cli(checkpoint, "--image", str(scans), "--text", EHR, "--cache-dir", str(cache))
    assert main([*arguments, "--output", str(tmp_path / "first.csv")]) == 0
    entries = sorted(cache.rglob("*.npy"))
    assert len(entries) == 2  # the two readable scans
    stamps = [entry.stat().st_mtime_ns for entry in entries]
    assert main([*arguments, "--output", str(tmp_path / "second.csv")]) == 0
    assert [entry.stat().st_mtime_ns for entry in sorted(cache.rglob("*.npy"))] == stamps  # served, not rebuilt
    assert read_rows(tmp_path / "second.csv") == read_rows(tmp_path / "first.csv")


def test_on_error_raise_stops_naming_the_file(checkpoint, scans, tmp_path, capsys):
    code = main(cli(checkpoint, "--image", str(scans), "--output", str(tmp_path / "r.csv"), "--on-error", "raise"))
    assert code != 0
    assert "corrupt.nii.gz" in capsys.readouterr().err


def test_csv_input_resolves_images_next_to_the_csv(checkpoint, scans, tmp_path):
    cases = scans / "cases.csv"
    cases.write_text("id,image,text\nsubject-1,icbm_t1.nii.gz,\"A 70-year-old male. MMSE 29, CDR 0.\"\n"
                     "subject-2,sub-02/t1_2mm.nii.gz,A 80-year-old female. MMSE 19.\n")
    results = tmp_path / "results.csv"
    assert main(cli(checkpoint, "--csv", str(cases), "--output", str(results))) == 0
    rows = read_rows(results)
    assert [(row["id"], row["image"]) for row in rows] == [("subject-1", "icbm_t1.nii.gz"),
                                                          ("subject-2", "sub-02/t1_2mm.nii.gz")]
    assert all(row["prediction"] in CLASS_ANSWERS and not row["error"] for row in rows)


def test_a_misspelt_option_is_a_usage_error_not_a_silent_default(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(cli(checkpoint, "--image", str(ICBM_T1), "--options", "lm_modle=/models/BioMedLM"))
    assert exit_info.value.code == 2 and "lm_modle" in capsys.readouterr().err


def write_dicom_series(folder: Path, volume: np.ndarray, spacing: float) -> None:
    """Axial slices as DICOM files named like scanner exports: no suffix, found by the DICM marker."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True)
    series_uid = generate_uid()
    for k in range(volume.shape[2]):
        dataset = Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID = MRImageStorage
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.SeriesInstanceUID, dataset.Modality, dataset.InstanceNumber = series_uid, "MR", k + 1
        dataset.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        dataset.ImagePositionPatient = [0.0, 0.0, k * spacing]
        dataset.PixelSpacing, dataset.SliceThickness = [spacing, spacing], spacing
        pixels = np.ascontiguousarray(volume[:, :, k].T.astype("<i2"))
        dataset.Rows, dataset.Columns = pixels.shape
        dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 16, 15, 1
        dataset.PixelData = pixels.tobytes()
        dataset.save_as(folder / f"IM{k:04d}", enforce_file_format=True)


def test_dicom_series_folders_count_as_one_scan(checkpoint, tmp_path, capsys):
    icbm = np.asanyarray(nib.load(ICBM_T1).dataobj)[::6, ::6, ::6]
    write_dicom_series(tmp_path / "export" / "S1", icbm, spacing=6.0)
    (tmp_path / "export" / "DICOMDIR").write_bytes(bytes(128) + b"DICM")  # an index, not a series
    (tmp_path / "scan.nii.gz").write_bytes(ICBM_T1.read_bytes())
    assert find_scans(tmp_path) == [tmp_path / "export" / "S1", tmp_path / "scan.nii.gz"]

    assert main(cli(checkpoint, "--image", str(tmp_path / "export" / "S1"), "--text", EHR)) == 0
    assert "diagnosis: " in capsys.readouterr().out


def test_module_entry_point_runs(checkpoint):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "lavis_medblip.predict", *cli(checkpoint, "--image", str(ICBM_T1))],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "diagnosis: " in result.stdout
