"""Bad input to ``python -m lavis_medblip.predict`` never loses work and is always reported (issue 14).

The results file is replaced whole or not at all; CSV errors name the file and line; degenerate scans get
a ``warning``; entries of a scanned folder that cannot be looked at get a row with an ``error``.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict_cli import cli, read_rows

from lavis_medblip.annotations.schema import CLASS_ANSWERS
from lavis_medblip.cli.predict import main
from lavis_medblip.inference import Predictor, cases_from_csv, resolve_device, search_scans

PREVIOUS_RESULTS = "id,image,prediction\nearlier-run,scan.nii.gz,AD\n"


def save_nifti(path: Path, volume: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


def brain_like(seed: int) -> np.ndarray:
    """A small random volume: read, scaled and diagnosed like any scan, in a fraction of a second."""
    return np.random.default_rng(seed).random((16, 16, 16)).astype(np.float32)


@pytest.fixture
def folder_with_a_corrupt_scan(tmp_path) -> Path:
    """good-1, corrupt, good-2: one batch of three in sorted order, the unreadable scan in the middle."""
    scans = tmp_path / "scans"
    save_nifti(scans / "a_good.nii.gz", brain_like(1))
    (scans / "b_corrupt.nii.gz").write_bytes(b"this is not a NIfTI file")
    save_nifti(scans / "c_good.nii.gz", brain_like(2))
    return scans


def files_in(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ---- the results file is written whole or not at all ------------------------------------------------


def test_failing_run_leaves_existing_results_untouched(checkpoint, folder_with_a_corrupt_scan, tmp_path, capsys):
    results = tmp_path / "out" / "results.csv"
    results.parent.mkdir()
    results.write_text(PREVIOUS_RESULTS)

    code = main(cli(checkpoint, "--image", str(folder_with_a_corrupt_scan), "--output", str(results),
                    "--on-error", "raise", "--batch-size", "3"))

    assert code == 1
    assert results.read_text() == PREVIOUS_RESULTS
    assert files_in(results.parent) == ["results.csv"]  # the temporary file is gone
    error = capsys.readouterr().err
    assert "b_corrupt.nii.gz: " in error  # the file and, after it, the reader's problem
    assert "2 of 3 scans diagnosed" in error  # the good scans of the failing batch were still scored
    assert f"{results} not written" in error


def test_good_scans_of_the_failing_batch_are_written_to_stdout_before_stopping(
        checkpoint, folder_with_a_corrupt_scan, capsys):
    code = main(cli(checkpoint, "--image", str(folder_with_a_corrupt_scan), "--on-error", "raise",
                    "--batch-size", "3"))

    assert code == 1
    printed = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(printed.out)))
    assert [row["id"] for row in rows] == ["a_good", "c_good"]
    assert all(row["prediction"] in CLASS_ANSWERS for row in rows)
    assert "only the rows above were written" in printed.err


def test_successful_run_replaces_results_whole_keeping_its_permissions(checkpoint, folder_with_a_corrupt_scan,
                                                                       tmp_path):
    results = tmp_path / "results.csv"
    results.write_text(PREVIOUS_RESULTS)
    results.chmod(0o640)

    assert main(cli(checkpoint, "--image", str(folder_with_a_corrupt_scan), "--output", str(results))) == 0

    assert [row["id"] for row in read_rows(results)] == ["a_good", "b_corrupt", "c_good"]
    assert results.stat().st_mode & 0o777 == 0o640
    assert files_in(tmp_path) == ["results.csv", "scans"]


def test_new_results_file_gets_the_usual_permissions(checkpoint, folder_with_a_corrupt_scan, tmp_path):
    results = tmp_path / "results.csv"
    umask = os.umask(0o022)
    try:
        assert main(cli(checkpoint, "--image", str(folder_with_a_corrupt_scan), "--output", str(results))) == 0
    finally:
        os.umask(umask)
    assert results.stat().st_mode & 0o777 == 0o644  # as open() makes it, not mkstemp's 0o600


def test_interrupted_run_leaves_existing_results_untouched(checkpoint, folder_with_a_corrupt_scan, tmp_path,
                                                           monkeypatch):
    results = tmp_path / "results.csv"
    results.write_text(PREVIOUS_RESULTS)

    def interrupt(self, volumes, texts):
        raise KeyboardInterrupt

    monkeypatch.setattr(Predictor, "predict", interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(cli(checkpoint, "--image", str(folder_with_a_corrupt_scan), "--output", str(results)))

    assert results.read_text() == PREVIOUS_RESULTS
    assert files_in(tmp_path) == ["results.csv", "scans"]


# ---- CSV input errors name the file and line --------------------------------------------------------


def write_cases(folder: Path, content: bytes) -> Path:
    save_nifti(folder / "scan.nii.gz", brain_like(3))
    cases = folder / "cases.csv"
    cases.write_bytes(content)
    return cases


def test_non_utf8_csv_error_names_the_file_line_and_byte(checkpoint, tmp_path, capsys):
    cases = write_cases(tmp_path, "id,image,text\n1,scan.nii.gz,ok\n2,scan.nii.gz,Québec\n".encode("latin-1"))

    with pytest.raises(SystemExit) as exit_info:
        main(cli(checkpoint, "--csv", str(cases)))

    assert exit_info.value.code == 2
    assert f"{cases}:3: not UTF-8 text (byte 0xe9 at column 17)" in capsys.readouterr().err


def test_utf8_csv_with_a_spreadsheet_bom_reads(tmp_path):
    cases = write_cases(tmp_path, "\ufeffid,image,text\n1,scan.nii.gz,Québec\n".encode("utf-8"))
    (case,) = cases_from_csv(cases).cases
    assert (case.case_id, case.text) == ("1", "Québec")


def test_ragged_row_with_on_error_raise_names_the_file_and_line(checkpoint, tmp_path, capsys):
    cases = write_cases(tmp_path, b"id,image,text\n1,scan.nii.gz,ok\n2,scan.nii.gz\n")

    with pytest.raises(SystemExit) as exit_info:
        main(cli(checkpoint, "--csv", str(cases), "--on-error", "raise"))

    assert exit_info.value.code == 2
    assert f"{cases}:3: 2 field(s) but the header has 3 (id,image,text)" in capsys.readouterr().err


def test_ragged_rows_are_counted_skips_by_default(checkpoint, tmp_path, capsys):
    cases = write_cases(tmp_path, b"id,image,text\n1,scan.nii.gz,ok\n2,scan.nii.gz\n"
                                  b"3,scan.nii.gz,A 70-year-old male, MMSE 29\n")
    results = tmp_path / "results.csv"

    assert main(cli(checkpoint, "--csv", str(cases), "--output", str(results))) == 0

    assert [row["id"] for row in read_rows(results)] == ["1"]
    error = capsys.readouterr().err
    assert f"skipped row {cases}:3: 2 field(s)" in error
    assert f"skipped row {cases}:4: 4 field(s)" in error
    assert "2 CSV row(s) skipped" in error


def test_ragged_row_after_a_multiline_text_is_reported_at_its_own_line(tmp_path):
    cases = write_cases(tmp_path, b'image,text\nscan.nii.gz,"line one\nline two"\nscan.nii.gz\n')
    with pytest.raises(ValueError, match=r"cases\.csv:4: 1 field\(s\)"):
        cases_from_csv(cases)
    from_csv = cases_from_csv(cases, skip_bad_rows=True)
    assert [case.text for case in from_csv.cases] == ["line one\nline two"]
    assert len(from_csv.skipped) == 1


# ---- degenerate scans are diagnosed with a warning --------------------------------------------------


def test_constant_volume_is_diagnosed_with_a_warning_column(checkpoint, tmp_path, capsys):
    scans = tmp_path / "scans"
    save_nifti(scans / "constant.nii.gz", np.full((16, 16, 16), 7, dtype=np.int16))
    save_nifti(scans / "good.nii.gz", brain_like(4))
    results = tmp_path / "results.csv"

    assert main(cli(checkpoint, "--image", str(scans), "--output", str(results))) == 0

    constant, good = read_rows(results)
    assert "constant.nii.gz: constant volume" in constant["warning"]
    assert constant["prediction"] in CLASS_ANSWERS and constant["error"] == ""
    assert good["warning"] == ""
    assert list(constant)[-2:] == ["error", "warning"]
    assert "1 with a warning (see the warning column)" in capsys.readouterr().err


def test_one_constant_scan_prints_its_warning_and_writes_it(checkpoint, tmp_path, capsys):
    scan = save_nifti(tmp_path / "constant.nii.gz", np.zeros((16, 16, 16), dtype=np.uint8))
    results = tmp_path / "results.csv"

    assert main(cli(checkpoint, "--image", str(scan), "--output", str(results))) == 0

    assert f"warning: {scan}: constant volume" in capsys.readouterr().out
    (row,) = read_rows(results)
    assert "constant volume" in row["warning"]


def test_mostly_nan_volume_is_diagnosed_with_a_warning(checkpoint, tmp_path):
    volume = brain_like(5)
    volume[:, :, :14] = np.nan
    scan = save_nifti(tmp_path / "mostly_nan.nii.gz", volume)
    results = tmp_path / "results.csv"

    assert main(cli(checkpoint, "--image", str(scan), "--output", str(results))) == 0

    (row,) = read_rows(results)
    assert "mostly_nan.nii.gz" in row["warning"] and row["prediction"] in CLASS_ANSWERS


def test_too_small_volume_is_an_error_row_not_a_diagnosis(checkpoint, tmp_path):
    scans = tmp_path / "scans"
    save_nifti(scans / "tiny.nii.gz", brain_like(6)[:2, :2, :2])
    save_nifti(scans / "good.nii.gz", brain_like(7))
    results = tmp_path / "results.csv"

    assert main(cli(checkpoint, "--image", str(scans), "--output", str(results))) == 0

    good, tiny = read_rows(results)
    assert "tiny.nii.gz" in tiny["error"] and tiny["prediction"] == ""
    assert good["prediction"] in CLASS_ANSWERS


# ---- entries of a scanned folder that cannot be looked at are reported ------------------------------


def test_symlink_loops_and_broken_links_in_a_folder_are_rows_with_an_error(checkpoint, tmp_path, capsys):
    scans = tmp_path / "scans"
    save_nifti(scans / "good.nii.gz", brain_like(8))
    (scans / "loop").symlink_to(scans, target_is_directory=True)  # a folder inside itself
    (scans / "ping.nii.gz").symlink_to(scans / "pong.nii.gz")  # two links pointing at each other
    (scans / "pong.nii.gz").symlink_to(scans / "ping.nii.gz")
    (scans / "moved.nii.gz").symlink_to(tmp_path / "elsewhere.nii.gz")  # a scan that is gone
    (scans / "sidecar.json").symlink_to(tmp_path / "elsewhere.json")  # gone, but not a scan: ignored
    results = tmp_path / "results.csv"

    assert main(cli(checkpoint, "--image", str(scans), "--output", str(results))) == 0

    rows = {row["id"]: row for row in read_rows(results)}
    assert list(rows) == ["good", "loop", "moved", "ping", "pong"]
    assert rows["good"]["prediction"] in CLASS_ANSWERS
    assert "already searched (a symlink loop" in rows["loop"]["error"]
    assert "broken symlink to" in rows["moved"]["error"]
    assert "symlink loop" in rows["ping"]["error"] and "symlink loop" in rows["pong"]["error"]
    assert all(rows[name]["prediction"] == "" for name in ("loop", "moved", "ping", "pong"))
    assert "1 of 5 scans diagnosed" in capsys.readouterr().err


def test_symlinked_folders_are_searched_once(tmp_path):
    shared = save_nifti(tmp_path / "shared" / "scan.nii.gz", brain_like(9)).parent
    scans = tmp_path / "scans"
    scans.mkdir()
    (scans / "site-a").symlink_to(shared, target_is_directory=True)
    (scans / "site-b").symlink_to(shared, target_is_directory=True)

    found = search_scans(scans)

    assert found.scans == [scans / "site-a" / "scan.nii.gz"]
    assert list(found.unsearchable) == [scans / "site-b"]


def test_folder_that_cannot_be_listed_is_reported(tmp_path, monkeypatch):
    scans = tmp_path / "scans"
    save_nifti(scans / "good.nii.gz", brain_like(10))
    (scans / "locked").mkdir()
    listdir = os.listdir

    def permission_denied_for_locked(path):  # chmod 000 does not stop root, so the test cannot rely on it
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return listdir(path)

    monkeypatch.setattr(os, "listdir", permission_denied_for_locked)
    found = search_scans(scans)

    assert found.scans == [scans / "good.nii.gz"]
    assert found.unsearchable == {scans / "locked": "cannot list folder: Permission denied"}


# ---- a device this machine lacks --------------------------------------------------------------------


def test_a_device_this_machine_lacks_is_a_usage_error_not_a_traceback(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    scan = save_nifti(tmp_path / "scan.nii.gz", brain_like(11))

    for device, problem in [("cuda", "device 'cuda': this machine has 0 CUDA device(s)"),
                            ("gpu", "device 'gpu': Expected one of cpu, cuda")]:
        with pytest.raises(SystemExit) as exit:
            main(cli(checkpoint, "--image", str(scan), "--device", device))
        assert exit.value.code == 2
        assert problem in capsys.readouterr().err

    assert resolve_device() == "cpu"
    assert resolve_device("cpu") == "cpu"
