"""Model files from anyone: loading never runs their code, and every failure names the file.

Each entry point that reads a ``.pth`` is tried with a malicious pickle (its ``__reduce__`` would
create a marker file): ``model.load_checkpoint``, evaluation with ``model.finetuned``, resume,
and the predict CLI. Then truncated, empty and mismatched checkpoints, and two runs sharing one
``output_dir``.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import lavis_medblip
from cohort_fixtures import write_small_cohort
from lavis_medblip.assets import ICBM_T1
from lavis_medblip.cli.predict import main as predict
from lavis_medblip.models import MedBLIP
from lavis_medblip.models.weights import CheckpointError
from lavis_medblip.runners.runner import make_unique_dir
from test_train_evaluate_launchers import dataset_config, launch, only_job_dir, run_config

PACKAGE = Path(lavis_medblip.__file__).parent


class RunsAShellCommand:
    """Pickled, this is a call of ``os.system``: unpickling it without ``weights_only`` would run it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "the_pickle_ran"


@pytest.fixture
def malicious_checkpoint(tmp_path, marker) -> Path:
    """A checkpoint whose weights fit the tiny model, with a shell command hidden in it."""
    model = MedBLIP.from_config(OmegaConf.load(MedBLIP.default_config_path("tiny")).model)
    path = tmp_path / "looks_fine.pth"
    torch.save({"model": model.checkpoint_state_dict(), "optimizer": RunsAShellCommand(marker), "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_small_cohort(tmp_path_factory.mktemp("cohort"), {"train": 4, "test": 3})


@pytest.fixture
def tiny_model(tiny_config) -> MedBLIP:
    return MedBLIP.from_config(tiny_config)


def run_yaml(cohort: Path, output_dir: Path, **run: object) -> dict:
    return {"model": {"arch": "medblip", "model_type": "tiny"},
            "datasets": dataset_config(cohort, ["train", "test"]),
            "run": run_config(output_dir, "medblip_classification", max_epoch=1, train_splits=["train"],
                              test_splits=["test"], **run)}


def run_module(module: str, config: dict, path: Path, *options: str) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", module, "--cfg-path", str(path), *(["--options", *options] if options else [])]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


# ---- a malicious pickle never runs ---------------------------------------------------------------
def test_load_checkpoint_refuses_a_pickle_that_runs_code(tiny_model, malicious_checkpoint, marker):
    with pytest.raises(CheckpointError, match="refused: loading it would run pickled code") as error:
        tiny_model.load_checkpoint(str(malicious_checkpoint))
    assert str(malicious_checkpoint) in str(error.value) and "posix.system" in str(error.value)
    assert not marker.exists()


def test_evaluating_with_a_malicious_finetuned_checkpoint_stops_before_it_runs(cohort, malicious_checkpoint, marker,
                                                                              tmp_path):
    config = run_yaml(cohort, tmp_path / "output", evaluate=True)
    config["model"].update(load_finetuned=True, finetuned=str(malicious_checkpoint))
    result = run_module("lavis_medblip.evaluate", config, tmp_path / "eval.yaml")
    assert result.returncode != 0
    assert f"{malicious_checkpoint}: refused" in result.stderr
    assert not marker.exists()


def test_resuming_from_a_malicious_checkpoint_stops_before_it_runs(cohort, malicious_checkpoint, marker, tmp_path):
    result = run_module("lavis_medblip.train", run_yaml(cohort, tmp_path / "output"), tmp_path / "train.yaml",
                        f"run.resume_ckpt_path={malicious_checkpoint}")
    assert result.returncode != 0
    assert f"{malicious_checkpoint}: refused" in result.stderr
    assert not marker.exists()


def test_predict_cli_refuses_a_malicious_checkpoint(malicious_checkpoint, marker, capsys):
    code = predict(["--model-type", "tiny", "--checkpoint", str(malicious_checkpoint), "--image", str(ICBM_T1)])
    assert code == 1
    assert f"error: cannot load the checkpoint {malicious_checkpoint}: refused" in capsys.readouterr().err
    assert not marker.exists()


def test_the_package_loads_pickles_only_with_weights_only():
    """Grep-level guard: one ``torch.load`` in the package, with ``weights_only=True``."""
    calls = []
    for path in PACKAGE.rglob("*.py"):
        assert "weights_only=False" not in path.read_text(), path
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                keywords = {keyword.arg: ast.unparse(keyword.value) for keyword in node.keywords}
                calls.append((path.relative_to(PACKAGE).as_posix(), keywords.get("weights_only")))
    assert calls == [("models/weights.py", "True")]


# ---- broken and mismatched checkpoints name the file ------------------------------------------------
def test_empty_and_truncated_checkpoints_name_the_file(tiny_model, tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: not a readable PyTorch checkpoint \(0 bytes"):
        tiny_model.load_checkpoint(str(empty))

    tiny_model.save_checkpoint(tmp_path / "whole.pth")
    whole = (tmp_path / "whole.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: not a readable PyTorch checkpoint"):
        tiny_model.load_checkpoint(str(truncated))


def test_a_checkpoint_of_another_variant_names_key_shapes_and_its_model(tiny_config, tmp_path):
    other = tiny_config.copy()
    other.num_query_token = 4
    other.model_type = "tiny_4_queries"
    MedBLIP.from_config(other).save_checkpoint(tmp_path / "other.pth")

    with pytest.raises(CheckpointError) as error:
        MedBLIP.from_config(tiny_config).load_checkpoint(str(tmp_path / "other.pth"))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'other.pth'}: does not fit this medblip tiny")
    assert "(it was saved from medblip tiny_4_queries)" in message
    queries = tuple(MedBLIP.from_config(tiny_config).query_tokens.shape)
    assert f"query_tokens: checkpoint {(1, 4, queries[2])}, model {queries}" in message


def test_saving_a_checkpoint_leaves_no_temporary_file(tiny_model, tmp_path):
    tiny_model.save_checkpoint(tmp_path / "model.pth")
    assert [path.name for path in tmp_path.iterdir()] == ["model.pth"]


# ---- runs never share a folder --------------------------------------------------------------------
def test_job_folders_are_never_reused(tmp_path):
    first = make_unique_dir(tmp_path, "20261204031500")
    second = make_unique_dir(tmp_path, "20261204031500")
    assert (first.name, second.name) == ("20261204031500", "20261204031500_2")


def test_two_runs_into_one_output_dir_keep_separate_folders(cohort, tmp_path):
    config = run_yaml(cohort, tmp_path / "output", evaluate=True)
    for name in ("first", "second"):
        launch("lavis_medblip.evaluate", config, tmp_path / f"{name}.yaml")
    folders = sorted(path for path in (tmp_path / "output").iterdir())
    assert len(folders) == 2
    for folder in folders:
        log = (folder / "log.txt").read_text()
        assert log.count('"test_agg_metrics"') == 1  # one run's results per log
