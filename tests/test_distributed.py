"""Two processes on CPU (gloo): the ITC all-gather, a torchrun launch of the trainer, and sharded evaluation."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from cohort_fixtures import write_small_cohort
from lavis_medblip.models.medblip import image_text_contrastive_loss
from test_train_evaluate_launchers import dataset_config, run_config


def global_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image_feats = torch.nn.functional.normalize(torch.randn(8, 4, 16, generator=generator), dim=-1)
    text_feat = torch.nn.functional.normalize(torch.randn(8, 16, generator=generator), dim=-1)
    return image_feats, text_feat


def _itc_on_one_rank(rank: int, world_size: int, store_file: str, losses: "mp.Queue") -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    image_feats, text_feat = global_batch()
    local = slice(rank * 4, rank * 4 + 4)  # each rank holds half of the global batch
    losses.put((rank, image_text_contrastive_loss(image_feats[local], text_feat[local], torch.tensor(0.07)).item()))
    dist.destroy_process_group()


def test_itc_with_all_gather_equals_the_single_process_loss_on_the_global_batch(tmp_path):
    context = mp.get_context("spawn")
    losses = context.Queue()
    processes = [context.Process(target=_itc_on_one_rank, args=(rank, 2, str(tmp_path / "store"), losses))
                 for rank in range(2)]
    for process in processes:
        process.start()
    per_rank = dict(losses.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0

    image_feats, text_feat = global_batch()
    single_process = image_text_contrastive_loss(image_feats, text_feat, torch.tensor(0.07)).item()
    assert sum(per_rank.values()) / 2 == pytest.approx(single_process, rel=1e-5)


def test_torchrun_trains_on_two_cpu_processes_and_only_rank_0_writes(tmp_path):
    annotations = write_small_cohort(tmp_path / "cohort", {"train": 8, "val": 2})
    config = {"model": {"arch": "medblip", "model_type": "tiny"},
              "datasets": dataset_config(annotations, ["train", "val"]),
              "run": run_config(tmp_path / "output", "medblip_pretrain", max_epoch=1, distributed=True,
                                dist_url="env://", train_splits=["train"], valid_splits=["val"])}
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(config))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    result = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29517", "-m", "lavis_medblip.train",
                             "--cfg-path", str(tmp_path / "ddp.yaml")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    (job_dir,) = list((tmp_path / "output").iterdir())
    train_log = [json.loads(line) for line in (job_dir / "log.txt").read_text().splitlines() if line.startswith('{"train')]
    # 8 samples, batch 2: each of the 2 ranks takes 2 steps on its half; the log sums both ranks
    assert train_log[0]["train_world_size"] == 2
    assert train_log[0]["train_iters_per_epoch"] == 2 and train_log[0]["train_num_steps"] == 4
    assert sorted(path.name for path in job_dir.glob("*.pth")) == ["checkpoint_best.pth", "checkpoint_latest.pth"]


def test_evaluation_on_two_cpu_processes_merges_the_shards_into_the_single_process_metrics(tmp_path):
    # 7 cases: the distributed sampler pads rank 1's shard with a repeat, which the merge must drop
    annotations = write_small_cohort(tmp_path / "cohort", {"test": 7})
    runs = {}
    for world_size in (1, 2):
        config = {"model": {"arch": "medblip", "model_type": "tiny"},
                  "datasets": dataset_config(annotations, ["test"]),
                  "run": run_config(tmp_path / f"output_{world_size}", "medblip_classification", evaluate=True,
                                    test_splits=["test"], distributed=world_size > 1, dist_url="env://")}
        (tmp_path / f"eval_{world_size}.yaml").write_text(yaml.safe_dump(config))
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
        result = subprocess.run([torchrun, f"--nproc_per_node={world_size}", "--master_port=29518",
                                 "-m", "lavis_medblip.evaluate", "--cfg-path", str(tmp_path / f"eval_{world_size}.yaml")],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        (job_dir,) = [path for path in (tmp_path / f"output_{world_size}").iterdir() if path.is_dir()]
        runs[world_size] = {name: json.loads((job_dir / "result" / f"test_epochbest_{name}.json").read_text())
                            for name in ("metrics", "predictions")}

    one, two = runs[1], runs[2]
    assert len(two["predictions"]) == 7 and one["metrics"]["num_samples"] == two["metrics"]["num_samples"] == 7
    by_case = lambda rows: sorted(rows, key=lambda row: row["instance_id"])  # noqa: E731
    for single, merged in zip(by_case(one["predictions"]), by_case(two["predictions"])):
        assert single["instance_id"] == merged["instance_id"] and single["prediction"] == merged["prediction"]
        assert merged["probs"] == pytest.approx(single["probs"], abs=1e-5)
    assert two["metrics"]["confusion_matrix"] == one["metrics"]["confusion_matrix"]
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        assert two["metrics"][name] == pytest.approx(one["metrics"][name], abs=1e-6), name
