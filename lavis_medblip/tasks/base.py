"""What every MedBLIP task shares: a training epoch that logs each loss term, and an evaluation
loop that runs on CPU as on GPU.

LAVIS's own loop logs only the total loss, and its end-of-epoch sync and evaluation assume CUDA;
these two loops are ours, and everything else (optimizer, schedulers, MetricLogger with ETA,
result merging across ranks) is LAVIS's.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

from lavis.common.dist_utils import get_world_size, is_dist_avail_and_initialized, is_main_process
from lavis.common.logger import MetricLogger, SmoothedValue
from lavis.common.registry import registry
from lavis.datasets.data_utils import prepare_sample
from lavis.tasks.base_task import BaseTask

logger = logging.getLogger(__name__)
LOSS_TERMS = ("loss", "loss_itc_text", "loss_itc_qa", "loss_lm")


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum per-rank numbers over all ranks (a no-op in a single process)."""
    if not is_dist_avail_and_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class StepLog:
    """Per-step losses as JSON lines in ``<output_dir>/train_steps.jsonl`` (rank 0), for loss curves."""

    def __init__(self) -> None:
        output_dir = registry.get_path("output_dir")
        self.handle = open(os.path.join(output_dir, "train_steps.jsonl"), "a") if output_dir and is_main_process() else None

    def write(self, entry: dict) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


class MedBLIPTask(BaseTask):
    #: the loss terms the model's output holds, logged each step and averaged per epoch
    loss_terms: tuple[str, ...] = LOSS_TERMS

    def train_epoch(
        self,
        epoch: int,
        model: torch.nn.Module,
        data_loader: Any,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        scaler: Any = None,
        cuda_enabled: bool = False,
        log_freq: int = 50,
        accum_grad_iters: int = 1,
    ) -> dict[str, float]:
        iters_per_epoch = len(data_loader)
        data_iter = data_loader if hasattr(data_loader, "__next__") else iter(data_loader)
        metric_logger = MetricLogger(delimiter="  ")
        metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value:.6f}"))
        for term in self.loss_terms:
            metric_logger.add_meter(term, SmoothedValue(window_size=1, fmt="{value:.4f}"))
        trainable = [p for p in model.parameters() if p.requires_grad]
        device = trainable[0].device
        totals = dict.fromkeys(self.loss_terms, 0.0)
        steps = skipped = 0

        step_log = StepLog()
        logger.info("Start training epoch %d, %d iters per epoch.", epoch, iters_per_epoch)
        for i in metric_logger.log_every(range(iters_per_epoch), log_freq, f"Train: data epoch: [{epoch}]"):
            samples = next(data_iter)
            skipped += samples.pop("num_skipped", 0)
            lr_scheduler.step(cur_epoch=epoch, cur_step=i)
            if "image" not in samples:
                # every sample of the batch was skipped: a zero loss keeps DDP's all-reduce in step
                loss = sum(p.sum() for p in trainable) * 0.0
                output = None
            else:
                samples = prepare_sample(samples, cuda_enabled=cuda_enabled)
                with torch.autocast("cuda", enabled=scaler is not None):
                    output = model(samples)
                loss = output["loss"]
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if (i + 1) % accum_grad_iters == 0:
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad()
            metric_logger.update(lr=optimizer.param_groups[0]["lr"])
            if output is not None:
                values = {term: output[term].detach().item() for term in self.loss_terms if output.get(term) is not None}
                metric_logger.update(**values)
                for term, value in values.items():
                    totals[term] += value
                steps += 1
                step_log.write({"epoch": epoch, "step": i, "lr": optimizer.param_groups[0]["lr"], **values})

        step_log.close()
        summed = all_reduce_sum([*totals.values(), steps, skipped], device)
        steps, skipped = int(summed[-2]), int(summed[-1])
        stats = {term: round(total / max(steps, 1), 4) for term, total in zip(self.loss_terms, summed)}
        stats.update(lr=optimizer.param_groups[0]["lr"], iters_per_epoch=iters_per_epoch, num_steps=steps,
                     num_skipped=skipped, world_size=get_world_size())
        logger.info("Averaged stats (all ranks): %s", stats)
        if skipped:
            logger.warning("epoch %d: %d sample(s) skipped (on_error: skip); see the warnings above", epoch, skipped)
        return stats

    def evaluation(self, model: torch.nn.Module, data_loader: Any, cuda_enabled: bool | None = None) -> list[dict]:
        if cuda_enabled is None:
            cuda_enabled = next(model.parameters()).device.type == "cuda"
        metric_logger = MetricLogger(delimiter="  ")
        results, skipped = [], 0
        for samples in metric_logger.log_every(data_loader, 10, "Evaluation"):
            skipped += samples.pop("num_skipped", 0)
            if "image" not in samples:
                continue
            samples = prepare_sample(samples, cuda_enabled=cuda_enabled)
            results.extend(self.valid_step(model=model, samples=samples))
        self.eval_num_skipped = int(all_reduce_sum([skipped], next(model.parameters()).device)[0])
        if self.eval_num_skipped:
            logger.warning("evaluation: %d sample(s) skipped (on_error: skip)", self.eval_num_skipped)
        return results

    def gather_results(self, val_result: list[dict], split_name: str, epoch: Any, name: str = "predictions",
                       unique_key: str = "instance_id") -> tuple[list[dict] | None, str]:
        """Merge per-rank results into ``<result_dir>/<split>_epoch<epoch>_<name>.json``.

        Returns the merged rows on the main process (``None`` elsewhere) and the file's path;
        duplicates that a distributed sampler pads in are dropped by ``unique_key``.
        """
        result_file = self.save_result(val_result, registry.get_path("result_dir"), f"{split_name}_epoch{epoch}_{name}",
                                       remove_duplicate=unique_key)
        if not is_main_process():
            return None, result_file
        with open(result_file) as handle:
            return json.load(handle), result_file

    @staticmethod
    def write_metrics(metrics: dict, split_name: str, epoch: Any) -> str:
        """``<result_dir>/<split>_epoch<epoch>_metrics.json``; returns the path without ``_metrics.json``."""
        stem = os.path.join(registry.get_path("result_dir"), f"{split_name}_epoch{epoch}")
        with open(f"{stem}_metrics.json", "w") as handle:
            json.dump(metrics, handle, indent=2)
        return stem

