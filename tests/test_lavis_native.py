"""LAVIS finds the plugin by itself, as LAVIS users run it: programs that import only LAVIS,
``python -m lavis.train`` / ``lavis.evaluate``, the sequence of LAVIS's own repo-root
``train.py`` / ``evaluate.py``, and LAVIS's unchanged ``runner_base``.

The programs these tests start never name our package: they rely on the start-up hook that
``pip install`` / ``make setup`` put into site-packages (``lavis_medblip_autoregister.pth``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import DataLoader

import lavis.common.optims  # noqa: F401  (registers the lr schedulers, as LAVIS's train.py's import does)
import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.common.registry import registry
from lavis.datasets.datasets.dataloader_utils import IterLoader
from lavis.runners.runner_base import RunnerBase

import lavis_medblip_autoregister
from cohort_fixtures import write_small_cohort
from test_train_evaluate_launchers import dataset_config, launch, only_job_dir, run_config

PLUGIN = "lavis_medblip"
REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter of this environment (fail on error); it must not name our package."""
    assert PLUGIN not in code  # what these programs find, they find by themselves
    disable = lavis_medblip_autoregister.DISABLE_VARIABLE
    environment = {key: value for key, value in os.environ.items() if key != disable}
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=cwd, capture_output=True,
                               text=True, timeout=600,
                               env={**environment, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", **env})
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


# ---- 1. registration without an import -----------------------------------------------------------------

PLUGIN_REGISTRY = """
import importlib.util, json
from lavis.common.registry import registry  # imports LAVIS: only the start-up hook can have registered anything

print(json.dumps({kind: sorted(f"{name}={cls.__module__}" for name, cls in table.items()
                               if not cls.__module__.startswith("lavis."))
                  for kind, table in registry.mapping.items() if kind.endswith("_name_mapping")}))
print(importlib.util.find_spec("lavis.train") is not None)
"""


def plugin_classes_registered_here() -> dict[str, list[str]]:
    """What ``import lavis_medblip`` (conftest) registered in this process, as :data:`PLUGIN_REGISTRY` prints it."""
    return {kind: sorted(f"{name}={cls.__module__}" for name, cls in table.items() if cls.__module__.startswith(PLUGIN))
            for kind, table in registry.mapping.items() if kind.endswith("_name_mapping")}


def test_a_program_that_imports_only_lavis_finds_every_model_builder_processor_task_and_runner(tmp_path):
    registered, has_launcher = run_python(PLUGIN_REGISTRY, tmp_path).stdout.splitlines()
    found = json.loads(registered)

    assert found == plugin_classes_registered_here()
    assert {"medblip=lavis_medblip.models.medblip", "medblip_caption=lavis_medblip.caption.model"} <= set(
        found["model_name_mapping"])
    assert "medblip_runner=lavis_medblip.runners.runner" in found["runner_name_mapping"]
    assert {"adni", "brain_mri", "m3d_vqa", "roco"} <= {entry.split("=")[0] for entry in found["builder_name_mapping"]}
    assert has_launcher == "True"


FINDERS_AT_START = """
import json, sys
print(json.dumps({"finders": [type(finder).__name__ for finder in sys.meta_path],
                  "imported": [name for name in ("torch", "lavis", "transformers", "omegaconf")
                               if name in sys.modules]}))
"""


def test_at_interpreter_start_the_hook_only_installs_its_finder_unless_the_variable_turns_it_off(tmp_path):
    started = json.loads(run_python(FINDERS_AT_START, tmp_path).stdout)
    assert started["finders"][0] == "LavisPluginFinder" and started["imported"] == []

    turned_off = json.loads(run_python(FINDERS_AT_START, tmp_path,
                                       **{lavis_medblip_autoregister.DISABLE_VARIABLE: "1"}).stdout)
    assert "LavisPluginFinder" not in turned_off["finders"]  # so importing LAVIS registers nothing of ours


# ---- 2. python -m lavis.train / lavis.evaluate ---------------------------------------------------------

@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """A few subjects from the real template; ``annotations/{train,val,test}.jsonl`` under the returned folder."""
    root = tmp_path_factory.mktemp("cohort")
    write_small_cohort(root, {"train": 4, "val": 2, "test": 2})
    return root


def test_tiny_model_trains_and_evaluates_through_python_m_lavis_train_and_evaluate(cohort, tmp_path):
    annotations = cohort / "annotations"
    pretrain = {"model": {"arch": "medblip", "model_type": "tiny"},
                "datasets": dataset_config(annotations, ["train", "val"]),
                "run": run_config(tmp_path / "pretrain", "medblip_pretrain", max_epoch=1, train_splits=["train"],
                                  valid_splits=["val"])}
    launch("lavis.train", pretrain, tmp_path / "pretrain.yaml")
    checkpoint = only_job_dir(tmp_path / "pretrain") / "checkpoint_best.pth"
    assert checkpoint.is_file()

    zero_shot = {"model": {"arch": "medblip", "model_type": "tiny", "load_finetuned": True,
                           "finetuned": str(checkpoint)},
                 "datasets": dataset_config(annotations, ["test"]),
                 "run": run_config(tmp_path / "eval", "medblip_classification", evaluate=True, test_splits=["test"])}
    launch("lavis.evaluate", zero_shot, tmp_path / "eval.yaml")
    metrics = json.loads((only_job_dir(tmp_path / "eval") / "result" / "test_epochbest_metrics.json").read_text())
    assert metrics["num_samples"] == 2 and 0.0 <= metrics["balanced_accuracy"] <= 1.0


# The demo's project files as they are, only smaller: one training step on two subjects (the demo's
# 3 epochs on 192 take minutes), evaluated on the same two, with one volume cache for both runs.
DEMO_SHRUNK = ("run.max_epoch=1", "run.batch_size_train=2", "run.num_workers=0")


def demo_project(name: str) -> dict:
    return yaml.safe_load((REPO / "projects" / "medblip" / name).read_text())


def test_demo_configuration_trains_and_evaluates_through_python_m_lavis_train_and_evaluate(cohort, tmp_path):
    two_subjects = cohort / "annotations" / "test.jsonl"
    volume_cache = [f"datasets.brain_mri.vis_processor.{split}.cache_dir={tmp_path / 'volumes'}"
                    for split in ("train", "eval")]
    launch("lavis.train", demo_project("demo_pretrain.yaml"), tmp_path / "demo_pretrain.yaml", *DEMO_SHRUNK,
           *volume_cache, f"datasets.brain_mri.build_info.annotations.train.storage={two_subjects}",
           f"run.output_dir={tmp_path / 'pretrain'}")
    checkpoint = only_job_dir(tmp_path / "pretrain") / "checkpoint_latest.pth"
    steps = (checkpoint.parent / "train_steps.jsonl").read_text().splitlines()
    assert len(steps) == 1

    launch("lavis.evaluate", demo_project("demo_eval.yaml"), tmp_path / "demo_eval.yaml", *DEMO_SHRUNK,
           volume_cache[1], f"datasets.brain_mri.build_info.annotations.test.storage={two_subjects}",
           f"run.output_dir={tmp_path / 'eval'}", f"model.finetuned={checkpoint}")
    metrics = json.loads((only_job_dir(tmp_path / "eval") / "result" / "test_epochbest_metrics.json").read_text())
    assert metrics["num_samples"] == 2 and metrics["mode"] == "rank"


# ---- 3. LAVIS's own repo-root train.py / evaluate.py ---------------------------------------------------

# main() of salesforce/LAVIS's train.py (then runner.train()) and of its evaluate.py (then
# runner.evaluate(skip_reload=True)), step for step, with their imports; the program runs the first on
# one config, then the second on another. One difference: evaluate.py builds ``RunnerBase`` itself rather
# than the runner the config names; on CPU RunnerBase cannot build a data loader (see section 4 below).
LAVIS_ROOT_SCRIPTS = """
import argparse, random, sys

import numpy as np
import torch
import torch.backends.cudnn as cudnn

import lavis.tasks as tasks
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, init_distributed_mode
from lavis.common.logger import setup_logger
from lavis.common.optims import LinearWarmupCosineLRScheduler, LinearWarmupStepLRScheduler
from lavis.common.registry import registry
from lavis.common.utils import now
from lavis.datasets.builders import *
from lavis.models import *
from lavis.processors import *
from lavis.runners import *
from lavis.tasks import *


def main(cfg_path, mode):
    job_id = now()
    cfg = Config(argparse.Namespace(cfg_path=cfg_path, options=None))
    init_distributed_mode(cfg.run_cfg)
    seed = cfg.run_cfg.seed + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    cudnn.benchmark = False
    cudnn.deterministic = True
    setup_logger()
    cfg.pretty_print()
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner = registry.get_runner_class(cfg.run_cfg.get("runner", "runner_base"))(
        cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
    if mode == "train":
        runner.train()
    else:
        runner.evaluate(skip_reload=True)


train_cfg, evaluate_cfg = sys.argv[1:]
main(train_cfg, "train")
main(evaluate_cfg, "evaluate")
"""


def relative_dataset_config(splits: list[str]) -> dict:
    """The tiny datasets with storage paths relative to ``run.cache_root``, as our project files write them."""
    return dataset_config(Path("annotations"), splits)


def test_lavis_root_script_sequence_runs_our_yaml_and_relative_paths_follow_run_cache_root(cohort, tmp_path):
    work = tmp_path / "work"  # the working directory, with a cohort of its own: a test split of 3
    write_small_cohort(work, {"test": 3}, seed=1)
    pretrain = {"model": {"arch": "medblip", "model_type": "tiny"},
                "datasets": relative_dataset_config(["train", "val"]),  # found only under run.cache_root
                "run": run_config("output", "medblip_pretrain", max_epoch=1, train_splits=["train"],
                                  valid_splits=["val"], cache_root=str(cohort))}
    zero_shot = {"model": {"arch": "medblip", "model_type": "tiny"},
                 "datasets": relative_dataset_config(["test"]),  # no run.cache_root: the working directory's
                 "run": run_config(tmp_path / "eval", "medblip_classification", evaluate=True, test_splits=["test"])}
    for name, config in (("pretrain", pretrain), ("eval", zero_shot)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))

    run_python(LAVIS_ROOT_SCRIPTS, work, str(tmp_path / "pretrain.yaml"), str(tmp_path / "eval.yaml"))

    job = only_job_dir(work / "output")  # a relative output_dir: under the working directory
    assert (job / "checkpoint_best.pth").is_file()
    assert json.loads((job / "log.txt").read_text().splitlines()[-1])["val_num_samples"] == 2  # run.cache_root's
    metrics = json.loads((only_job_dir(tmp_path / "eval") / "result" / "test_epochbest_metrics.json").read_text())
    assert metrics["num_samples"] == 3  # the working directory's


# ---- 4. LAVIS's unchanged runner_base ------------------------------------------------------------------

class RunnerBaseWithoutPrefetch(RunnerBase):
    """RunnerBase with the one CPU-impossible step left out: its loaders without ``PrefetchLoader`` (CUDA streams)."""

    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns, dataset_ratios=None):
        loaders = []
        for dataset, batch_size, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=is_train,
                                collate_fn=collate_fn, drop_last=is_train)
            loaders.append(IterLoader(loader) if is_train else loader)
        return loaders


def unregister_output_paths() -> None:
    """RunnerBase registers its output folders and refuses to register them twice: one RunnerBase per process,
    as LAVIS's scripts make. These tests make several in one."""
    for name in ("output_dir", "result_dir"):
        registry.mapping["paths"].pop(name, None)


@pytest.fixture
def output_paths_unregistered():
    unregister_output_paths()
    yield
    unregister_output_paths()


def build_runner(cohort: Path, output_dir: Path, task: str, device: str, runner_cls: type | None = None,
                 model: dict | None = None, **run: object) -> RunnerBase:
    """The tiny model with ``run.runner: runner_base``, built in this process as LAVIS's train.py builds it."""
    splits = [*run.get("train_splits", []), *run.get("valid_splits", []), *run.get("test_splits", [])]
    config = {"model": {"arch": "medblip", "model_type": "tiny", **(model or {})},
              "datasets": dataset_config(cohort / "annotations", splits),
              "run": run_config(output_dir, task, runner="runner_base", device=device, **run)}
    path = output_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(config))
    cfg = Config(argparse.Namespace(cfg_path=str(path), options=None))
    assert registry.get_runner_class(cfg.run_cfg.runner) is RunnerBase
    task_ = tasks.setup_task(cfg)
    return (runner_cls or RunnerBase)(cfg=cfg, job_id="job", task=task_, model=task_.build_model(cfg),
                                      datasets=task_.build_datasets(cfg))


def failing_runner_base_line(error: pytest.ExceptionInfo) -> str:
    """The line of ``lavis/runners/runner_base.py`` the error came through last."""
    frames = [frame for frame in traceback.extract_tb(error.tb) if frame.filename.endswith("runners/runner_base.py")]
    return frames[-1].line


TRAIN_AND_TEST = {"max_epoch": 1, "evaluate": False, "train_splits": ["train"], "test_splits": ["test"]}


def test_on_cpu_runner_base_never_wraps_the_model(cohort, tmp_path, output_paths_unregistered):
    runner = build_runner(cohort, tmp_path / "output", "medblip_pretrain", "cpu", **TRAIN_AND_TEST)
    assert runner.model is None  # it wraps only when it moves the model to another device; on CPU nothing moves
    with pytest.raises(AttributeError) as error:
        runner.train()
    assert failing_runner_base_line(error) == "self.model.train()"


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows what fails on a machine without CUDA")
def test_without_cuda_runner_base_cannot_build_a_data_loader(cohort, tmp_path, output_paths_unregistered):
    # "cpu:0" differs from the model's "cpu", so the model property moves and wraps it: past the line above.
    trainer = build_runner(cohort, tmp_path / "pretrain", "medblip_pretrain", "cpu:0", **TRAIN_AND_TEST)
    assert trainer.model is not None
    with pytest.raises(RuntimeError) as error:  # torch.cuda.Stream(): no CUDA driver
        trainer.train()
    assert failing_runner_base_line(error) == "loader = PrefetchLoader(loader)"

    unregister_output_paths()
    evaluator = build_runner(cohort, tmp_path / "eval", "medblip_classification", "cpu:0", evaluate=True,
                             test_splits=["test"])
    with pytest.raises(RuntimeError) as error:
        evaluator.evaluate(skip_reload=True)  # what LAVIS's evaluate.py runs
    assert failing_runner_base_line(error) == "loader = PrefetchLoader(loader)"


def test_without_a_process_group_runner_base_stops_after_the_first_epoch(cohort, tmp_path, output_paths_unregistered):
    runner = build_runner(cohort, tmp_path / "output", "medblip_pretrain", "cpu:0", RunnerBaseWithoutPrefetch,
                          **TRAIN_AND_TEST)
    with pytest.raises(ValueError, match="process group") as error:
        runner.train()
    assert failing_runner_base_line(error) == "dist.barrier()"
    assert (tmp_path / "output" / "job" / "checkpoint_0.pth").is_file()  # the epoch itself ran


@pytest.fixture
def one_process_group(tmp_path):
    """A process group of one (gloo), for RunnerBase's unguarded ``dist.barrier()`` after every epoch."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_past_those_lines_runner_base_trains_tests_and_evaluates_the_tiny_model(cohort, tmp_path, one_process_group,
                                                                              output_paths_unregistered):
    trainer = build_runner(cohort, tmp_path / "pretrain", "medblip_pretrain", "cpu:0", RunnerBaseWithoutPrefetch,
                           **{**TRAIN_AND_TEST, "max_epoch": 2})
    trainer.train()
    job = tmp_path / "pretrain" / "job"
    assert {"checkpoint_0.pth", "checkpoint_1.pth"} <= {path.name for path in job.iterdir()}
    assert json.loads((job / "result" / "test_epoch1_losses.json").read_text())  # tested after the last epoch
    train_logs = [json.loads(line) for line in (job / "log.txt").read_text().splitlines() if line.startswith('{"train')]
    assert [{"train_loss_itc_text", "train_loss_lm"} <= set(entry) for entry in train_logs] == [True, True]

    unregister_output_paths()
    evaluator = build_runner(cohort, tmp_path / "eval", "medblip_classification", "cpu:0", RunnerBaseWithoutPrefetch,
                             model={"load_finetuned": True, "finetuned": str(job / "checkpoint_1.pth")},
                             evaluate=True, test_splits=["test"])
    metrics = evaluator.evaluate(skip_reload=True)["test"]  # what LAVIS's evaluate.py runs
    assert metrics["num_samples"] == 2
    assert (tmp_path / "eval" / "job" / "result" / "test_epochbest_metrics.json").is_file()


def test_runner_base_keeps_no_best_checkpoint_while_the_validation_metric_is_not_positive(
        cohort, tmp_path, one_process_group, output_paths_unregistered):
    # Pretraining's agg_metrics is minus the loss; RunnerBase's best starts at 0 (and only a split named "val" counts).
    runner = build_runner(cohort, tmp_path / "output", "medblip_pretrain", "cpu:0", RunnerBaseWithoutPrefetch,
                          **TRAIN_AND_TEST, valid_splits=["val"])
    with pytest.raises(FileNotFoundError, match="checkpoint_best.pth") as error:
        runner.train()  # then tests "best": reloads a checkpoint it never wrote
    assert failing_runner_base_line(error) == 'checkpoint = torch.load(checkpoint_path, map_location="cpu")'
    log = (tmp_path / "output" / "job" / "log.txt").read_text().splitlines()
    assert [json.loads(line)["val_agg_metrics"] < 0 for line in log if line.startswith('{"val')] == [True]

