"""What every MedBLIP task shares: a training epoch that logs each loss term, an evaluation loop
that runs on CPU as on GPU, and one count of what was skipped per split.
"""
from __future__ import annotations

import json
import logging
import numbers
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


def scheduled_lr(optimizer: torch.optim.Optimizer) -> float:
    """The lr the schedule sets, before the runner's ``run.lr_scales`` multipliers (the groups are sorted by scale, so
    the first group's own lr may be a scaled part's), so that logs and curves show the configured schedule."""
    group = optimizer.param_groups[0]
    return group.get("scheduled_lr", group["lr"])


def write_scalars(writer: Any, prefix: str, stats: dict, step: int) -> None:
    """The top-level numbers of ``stats`` (not flags, not nested tables) as ``<prefix>/<key>`` at ``step``.

    ``writer`` is a ``torch.utils.tensorboard.SummaryWriter``, or ``None`` (TensorBoard is off).
    """
    if writer is None:
        return
    for key, value in stats.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            writer.add_scalar(f"{prefix}/{key}", float(value), step)


class StepLog:
    """Per-step losses and lr as JSON lines in ``<output_dir>/train_steps.jsonl`` (rank 0), for loss curves,
    and as ``train/<term>`` scalars at step ``epoch * iters_per_epoch + step`` when TensorBoard is on."""

    def __init__(self, tensorboard: Any = None, iters_per_epoch: int = 0) -> None:
        output_dir = registry.get_path("output_dir")
        self.handle = open(os.path.join(output_dir, "train_steps.jsonl"), "a") if output_dir and is_main_process() else None
        self.tensorboard, self.iters_per_epoch = tensorboard, iters_per_epoch

    def write(self, entry: dict) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps(entry) + "\n")
        scalars = {key: value for key, value in entry.items() if key not in ("epoch", "step")}
        write_scalars(self.tensorboard, "train", scalars, entry["epoch"] * self.iters_per_epoch + entry["step"])

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


class MedBLIPTask(BaseTask):
    """LAVIS's task with our :meth:`train_epoch` and :meth:`evaluation` loops.

    LAVIS's own loop logs only the total loss, and its end-of-epoch sync and evaluation assume CUDA;
    everything else (optimizer, schedulers, MetricLogger with ETA, result merging across ranks) is
    LAVIS's. Skips are counted once per split (:meth:`skip_counts`).
    """

    #: the loss terms the model's output holds, logged each step and averaged per epoch
    loss_terms: tuple[str, ...] = LOSS_TERMS
    #: a ``SummaryWriter`` that the runner sets on rank 0 when ``run.tensorboard`` is true
    tensorboard: Any = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.skipped_annotations: dict[str, int] = {}  # split -> annotation lines skipped while reading it
        self.train_splits: list[str] = ["train"]
        self.eval_counts = {"num_skipped_samples": 0, "num_degenerate": 0}

    def build_datasets(self, cfg: Any) -> dict:
        """LAVIS's, then count each split's skipped annotation lines (summed over datasets) and say so."""
        datasets = super().build_datasets(cfg)
        self.train_splits = list(cfg.run_cfg.get("train_splits", ["train"]))
        for splits in datasets.values():
            for split, dataset in splits.items():
                count = len(getattr(dataset, "skipped_annotations", ()))
                self.skipped_annotations[split] = self.skipped_annotations.get(split, 0) + count
        for split, count in self.skipped_annotations.items():
            if count:
                logger.warning("split %s: %d annotation line(s) skipped (on_error: skip); see the warnings above",
                               split, count)
        return datasets

    def skip_counts(self, splits: list[str], num_skipped_samples: int, num_degenerate: int) -> dict[str, int]:
        """What was skipped in ``splits`` (the training splits, or one evaluated split).

        Counted once, per split, in the run log, the metrics JSON and the console: ``num_skipped`` =
        ``num_skipped_annotations`` (lines dropped while reading the split's annotation files) +
        ``num_skipped_samples`` (scans that failed to load, this epoch); ``num_degenerate`` counts
        scans kept with a warning (constant, mostly NaN, ...).
        """
        annotations = sum(self.skipped_annotations.get(split, 0) for split in splits)
        return {"num_skipped": annotations + num_skipped_samples, "num_skipped_annotations": annotations,
                "num_skipped_samples": num_skipped_samples, "num_degenerate": num_degenerate}

    def eval_skip_counts(self, split_name: str) -> dict[str, int]:
        """:meth:`skip_counts` of the split just evaluated, logged when any is non-zero."""
        counts = self.skip_counts([split_name], **self.eval_counts)
        if any(counts.values()):
            logger.warning("%s: %s", split_name, counts)
        return counts

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
        trainable = [p for p in model.parameters() if p.requires_grad]
        device = trainable[0].device
        totals = dict.fromkeys(self.loss_terms, 0.0)
        reported = dict.fromkeys(self.loss_terms, 0)  # steps that reported each term (a batch may have none)
        steps = skipped = degenerate = 0

        step_log = StepLog(self.tensorboard, iters_per_epoch)
        logger.info("Start training epoch %d, %d iters per epoch.", epoch, iters_per_epoch)
        for i in metric_logger.log_every(range(iters_per_epoch), log_freq, f"Train: data epoch: [{epoch}]"):
            samples = next(data_iter)
            skipped += samples.pop("num_skipped", 0)
            degenerate += samples.pop("num_degenerate", 0)
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
            metric_logger.update(lr=scheduled_lr(optimizer))
            if output is not None:
                values = {term: output[term].detach().item() for term in self.loss_terms if output.get(term) is not None}
                for term in values:  # added on first use: an empty meter cannot be printed (all samples skipped)
                    if term not in metric_logger.meters:
                        metric_logger.add_meter(term, SmoothedValue(window_size=1, fmt="{value:.4f}"))
                metric_logger.update(**values)
                for term, value in values.items():
                    totals[term] += value
                    reported[term] += 1
                steps += 1
                step_log.write({"epoch": epoch, "step": i, "lr": scheduled_lr(optimizer), **values})

        step_log.close()
        summed = all_reduce_sum([*totals.values(), *reported.values(), steps, skipped, degenerate], device)
        steps, skipped, degenerate = (int(value) for value in summed[-3:])
        term_steps = summed[len(totals):2 * len(totals)]
        stats = {term: round(total / max(count, 1), 4) for term, total, count in zip(self.loss_terms, summed, term_steps)}
        counts = self.skip_counts(self.train_splits, skipped, degenerate)
        stats.update(lr=scheduled_lr(optimizer), iters_per_epoch=iters_per_epoch, num_steps=steps,
                     **counts, world_size=get_world_size())
        logger.info("Averaged stats (all ranks): %s", stats)
        if counts["num_skipped"] or degenerate:
            logger.warning("epoch %d: %s; see the warnings above", epoch, counts)
        return stats

    def evaluation(self, model: torch.nn.Module, data_loader: Any, cuda_enabled: bool | None = None) -> list[dict]:
        if cuda_enabled is None:
            cuda_enabled = next(model.parameters()).device.type == "cuda"
        metric_logger = MetricLogger(delimiter="  ")
        results, skipped, degenerate = [], 0, 0
        for samples in metric_logger.log_every(data_loader, 10, "Evaluation"):
            skipped += samples.pop("num_skipped", 0)
            degenerate += samples.pop("num_degenerate", 0)
            if "image" not in samples:
                continue
            samples = prepare_sample(samples, cuda_enabled=cuda_enabled)
            results.extend(self.valid_step(model=model, samples=samples))
        skipped, degenerate = (int(value) for value in all_reduce_sum([skipped, degenerate], next(model.parameters()).device))
        self.eval_counts = {"num_skipped_samples": skipped, "num_degenerate": degenerate}
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

