"""LAVIS finds the plugin by itself, as LAVIS users run it: programs that import only LAVIS,
``python -m lavis.train`` / ``lavis.evaluate``, the sequence of LAVIS's own repo-root
``train.py`` / ``evaluate.py``.

The programs these tests start never name our package: they rely on the start-up hook that
``pip install`` / ``make setup`` put into site-packages (``lavis_medblip_autoregister.pth``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lavis.common.registry import registry

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
    assert {"medblip=lavis_medblip.models.medblip", "medblip_caption=lavis_medblip.models.caption_2d"} <= set(
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
