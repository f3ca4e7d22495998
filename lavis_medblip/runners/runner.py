"""``medblip_runner``: LAVIS's ``RunnerBase`` with what breaks off-GPU fixed, and safer checkpoints.
On a GPU it trains as LAVIS does; what each override changes, and why, is in :class:`MedBLIPRunner`
and in the README (LAVIS's own scripts and ``runner_base``).
"""
from __future__ import annotations

import datetime
import fnmatch
import itertools
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from lavis.common.dist_utils import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from lavis.common.registry import registry
from lavis.datasets.datasets.dataloader_utils import PrefetchLoader
from lavis.runners.runner_base import RunnerBase

from lavis_medblip.datasets.collate import collate_skipping
from lavis_medblip.models.weights import CheckpointError, read_checkpoint
from lavis_medblip.storage import atomic_save
from lavis_medblip.tasks.base import write_scalars

logger = logging.getLogger(__name__)
CHECKPOINT_FORMATS = ("pth", "bundle")
BEST_BUNDLE = "model_best"  # run.checkpoint_format: bundle's checkpoint_best.pth


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


class EpochLoader:
    """An endless training iterator (like LAVIS's ``IterLoader``) whose epoch is a function of (seed, epoch).

    The sampler's shuffle and the loader's worker seeds (hence augmentation in workers) are both
    re-seeded per epoch, so a resumed run sees the same batches, and iterating never draws from
    the global RNG.
    """

    def __init__(self, loader: Any, sampler: DistributedSampler, generator: torch.Generator, seed: int):
        self.loader, self.sampler, self.generator, self.seed = loader, sampler, generator, seed
        self.epoch, self._iterator = 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)
        self.generator.manual_seed(self.seed + epoch)
        self._iterator = iter(self.loader)

    def __next__(self) -> Any:
        if self._iterator is None:
            self.set_epoch(self.epoch)
        try:
            return next(self._iterator)
        except StopIteration:
            self.set_epoch(self.epoch + 1)
            return next(self._iterator)

    def __iter__(self) -> "EpochLoader":
        return self

    def __len__(self) -> int:
        return len(self.loader)


def lr_scale_for(name: str, lr_scales: Mapping[str, float]) -> float:
    """The multiplier of the first pattern (``fnmatch``) in ``lr_scales`` that matches ``name``, else 1."""
    for pattern, scale in lr_scales.items():
        if fnmatch.fnmatchcase(name, pattern):
            return float(scale)
    return 1.0


def scaled_param_groups(model: torch.nn.Module, weight_decay: float, lr_scales: Optional[Mapping[str, float]]) -> list[dict]:
    """AdamW groups as LAVIS makes them (no decay on biases, norms and 1-D tensors), split by lr scale.

    Each group carries ``lr_scale``; :class:`ScaledLRScheduler` multiplies the scheduled lr by it.
    """
    lr_scales = dict(lr_scales or {})
    trainable = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    unused = [pattern for pattern in lr_scales if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in trainable)]
    if unused:
        raise ValueError(f"run.lr_scales patterns match no trainable parameter: {unused}")
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in trainable:
        no_decay = parameter.ndim < 2 or "bias" in name or "ln" in name or "bn" in name
        groups.setdefault((lr_scale_for(name, lr_scales), no_decay), []).append(parameter)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale}
        for (scale, no_decay), params in sorted(groups.items(), key=lambda item: item[0])
    ]


class ScaledLRScheduler:
    """Wraps a LAVIS scheduler: after it sets the lr of every group, multiply by each group's ``lr_scale``. The lr
    it set stays in ``group["scheduled_lr"]``, for the logs (a scale may be 0)."""

    def __init__(self, scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
        self.scheduler, self.optimizer = scheduler, optimizer

    def step(self, cur_epoch: int, cur_step: int) -> None:
        self.scheduler.step(cur_epoch=cur_epoch, cur_step=cur_step)
        for group in self.optimizer.param_groups:
            group["scheduled_lr"] = group["lr"]
            group["lr"] *= group.get("lr_scale", 1.0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.scheduler, name)


@registry.register_runner("medblip_runner")
class MedBLIPRunner(RunnerBase):
    """LAVIS's runner (DDP on ``device_ids=[gpu]``, prefetching loaders, AMP on a GPU), except that:

    - the ``model`` property also wraps when the model is already on the device (on CPU it was None);
    - DDP gets no ``device_ids`` on CPU, loaders no CUDA streams or pinned memory;
    - every epoch's data order depends only on (seed, epoch), so a resumed run sees the same batches;
    - checkpoints hold the trained parameters only (trainable now, or loaded from an earlier stage's
      checkpoint), are written atomically (temp file, then rename) and read with ``weights_only=True``;
      ``checkpoint_latest.pth`` / ``checkpoint_best.pth`` are kept; resume restores model, optimizer,
      scaler, epoch, best metric and RNG states;
    - ``output_dir`` is absolute or relative to the working directory, never inside site-packages,
      and each run gets a folder of its own (LAVIS's job folders are named to the 10 minutes);
    - barriers are guarded, so one process without a process group works;
    - ``run.lr_scales`` maps parameter-name patterns to learning-rate multipliers (e.g. parts that
      start random learn faster than pretrained ones), applied after each scheduler step, since
      LAVIS's schedulers set one lr for every parameter group;
    - ``run.checkpoint_format: bundle`` (default ``pth``) writes the best model as a self-contained bundle folder
      ``model_best/`` (safetensors, config, model card: :mod:`lavis_medblip.models.bundle`) instead of
      ``checkpoint_best.pth``, and a calibrated model as ``model_calibrated/``; ``checkpoint_latest.pth``, with
      the optimizer and RNG states that resume needs, stays a ``.pth``;
    - ``run.tensorboard: true`` (default false) writes, on rank 0, TensorBoard events to the job folder's
      ``tensorboard/``: each step's loss terms and lr (``train/<term>``, by the task's :class:`StepLog`), and
      each evaluation's numbers (``<split>/agg_metrics``, ..., at the epoch evaluated).
    """

    def __init__(self, cfg: Any, task: Any, model: torch.nn.Module, datasets: dict, job_id: str):
        self.best_agg_metric, self.best_epoch = float("-inf"), -1
        self.best_metrics: dict | None = None  # the first valid split's log at the best epoch, for a bundle's card
        super().__init__(cfg, task, model, datasets, job_id)
        wanted = bool(cfg.run_cfg.get("tensorboard", False)) and is_main_process()
        self.tensorboard = open_summary_writer(self.output_dir / "tensorboard") if wanted else None
        task.tensorboard = self.tensorboard
        self.checkpoint_format = cfg.run_cfg.get("checkpoint_format", "pth")
        if self.checkpoint_format not in CHECKPOINT_FORMATS or (
                self.checkpoint_format == "bundle" and not hasattr(model, "save_pretrained")):
            raise ValueError(f"run.checkpoint_format must be one of {list(CHECKPOINT_FORMATS)} (bundle: for medblip "
                             f"models), got {self.checkpoint_format!r} for {type(model).__name__}")

    # ---- device and distributed ---------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        if self._wrapped_model is None:
            if self.device.type == "cpu":
                self._model = self._model.float()  # fp16 ViT/LM weights are for GPUs
            self._model = self._model.to(self.device)
            if self.use_distributed:
                device_ids = [self.config.run_cfg.gpu] if self.device.type == "cuda" else None
                self._wrapped_model = DDP(self._model, device_ids=device_ids,
                                          find_unused_parameters=self.config.run_cfg.get("find_unused_parameters", False))
            else:
                self._wrapped_model = self._model
        return self._wrapped_model

    # ---- optimisation -------------------------------------------------------------------------------
    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            run_cfg = self.config.run_cfg
            lr_scales = run_cfg.get("lr_scales", None)
            model = self.unwrap_dist_model(self.model)  # names without DDP's "module." prefix
            groups = scaled_param_groups(model, float(run_cfg.weight_decay), lr_scales)
            logger.info("number of trainable parameters: %d", sum(p.numel() for g in groups for p in g["params"]))
            for group in groups:
                if group["lr_scale"] != 1.0:
                    logger.info("lr x %g for %d tensors", group["lr_scale"], len(group["params"]))
            self._optimizer = torch.optim.AdamW(
                groups, lr=float(run_cfg.init_lr), weight_decay=float(run_cfg.weight_decay),
                betas=(0.9, run_cfg.get("beta2", 0.999)),
            )
        return self._optimizer

    @property
    def lr_scheduler(self) -> ScaledLRScheduler:
        if self._lr_sched is None:
            self._lr_sched = ScaledLRScheduler(super().lr_scheduler, self.optimizer)
        return self._lr_sched

    def create_loaders(self, datasets, num_workers, batch_sizes, is_trains, collate_fns, dataset_ratios=None):
        # Workers fork each epoch after the LM tokenised: tokenizers would then disable its pool, warning each time
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loaders = []
        seed = int(self.config.run_cfg.get("seed", 42))
        for dataset, batch_size, is_train, collate_fn in zip(datasets, batch_sizes, is_trains, collate_fns):
            if isinstance(dataset, (list, tuple)):
                raise ValueError("medblip_runner takes map-style datasets only (no webdataset pipelines)")
            if isinstance(dataset, ConcatDataset):  # LAVIS wraps train splits; its collater can't take skipped samples
                collate_fn = collate_skipping
            sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=is_train,
                                         seed=seed, drop_last=is_train)
            if not is_train and not self.use_dist_eval_sampler:
                sampler = None
            generator = torch.Generator().manual_seed(seed)
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, sampler=sampler,
                                collate_fn=collate_fn, drop_last=is_train, pin_memory=self.device.type == "cuda",
                                generator=generator)
            if self.device.type == "cuda":
                loader = PrefetchLoader(loader)
            loaders.append(EpochLoader(loader, sampler, generator, seed) if is_train else loader)
        return loaders

    def setup_output_dir(self) -> None:
        """A new ``<output_dir>/<job_id>`` (``<job_id>_2``, ... if taken): runs never share a folder."""
        job_dir = [str(make_unique_dir(Path(self.config.run_cfg.output_dir).expanduser().resolve(), self.job_id))
                   if is_main_process() else None]
        if is_dist_avail_and_initialized():
            dist.broadcast_object_list(job_dir, src=0)
        output_dir = Path(job_dir[0])
        result_dir = output_dir / "result"
        result_dir.mkdir(parents=True, exist_ok=True)
        for name, path in (("result_dir", result_dir), ("output_dir", output_dir)):
            registry.mapping["paths"][name] = str(path)  # LAVIS refuses to re-register a path
        self.result_dir, self.output_dir, self.job_id = result_dir, output_dir, output_dir.name

    @property
    def evaluate_only(self) -> bool:
        return bool(self.config.run_cfg.get("evaluate", False))  # optional in our YAMLs

    @property
    def valid_splits(self) -> list[str]:  # RunnerBase's logs at every read: 44 times in a demo lane
        return list(self.config.run_cfg.get("valid_splits", []))

    # ---- the loop -----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        self.train_loader.set_epoch(epoch)
        return super().train_epoch(epoch)

    def train(self) -> None:
        try:
            self._train()
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()

    def _train(self) -> None:
        start_time = time.time()
        self.log_config()
        if not self.valid_splits:
            logger.info("No validation splits found: the last epoch's model is the one evaluated.")
        if not self.evaluate_only and self.resume_ckpt_path:
            self._load_checkpoint(self.resume_ckpt_path)

        cur_epoch = self.start_epoch
        for cur_epoch in range(self.start_epoch, self.max_epoch):
            if not self.evaluate_only:
                self.log_stats(split_name="train", stats={**self.train_epoch(cur_epoch), "epoch": cur_epoch})
            is_best = not self.valid_splits
            for split_name in self.valid_splits:
                val_log = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch)
                if val_log is not None and is_main_process():
                    if split_name == self.valid_splits[0] and val_log["agg_metrics"] > self.best_agg_metric:
                        self.best_agg_metric, self.best_epoch, is_best = val_log["agg_metrics"], cur_epoch, True
                        self.best_metrics = {split_name: val_log}
                    self.log_stats({**val_log, "best_epoch": self.best_epoch, "epoch": cur_epoch}, split_name)
                    write_scalars(self.tensorboard, split_name, val_log, cur_epoch)
            if self.evaluate_only:
                break
            self._save_checkpoint(cur_epoch, is_best=is_best)
            barrier()

        self.evaluate(cur_epoch="best" if self.valid_splits else cur_epoch, skip_reload=self.evaluate_only)
        logger.info("Training time %s", datetime.timedelta(seconds=int(time.time() - start_time)))

    def evaluate(self, cur_epoch: Any = "best", skip_reload: bool = False) -> dict:
        test_logs = {}
        for split_name in self.test_splits:
            test_logs[split_name] = self.eval_epoch(split_name=split_name, cur_epoch=cur_epoch, skip_reload=skip_reload)
            if test_logs[split_name] is not None:
                self.log_stats(test_logs[split_name], split_name)
                step = cur_epoch if isinstance(cur_epoch, int) else max(self.best_epoch, 0)  # "best": its epoch
                write_scalars(self.tensorboard, split_name, test_logs[split_name], step)
        if self.tensorboard is not None:
            self.tensorboard.flush()
        model = self.unwrap_dist_model(self.model)
        if self.checkpoint_format == "bundle" and is_main_process() and not model.calibration.is_identity:
            self.save_bundle(model, "model_calibrated", {split: log for split, log in test_logs.items() if log})
        return test_logs

    # ---- checkpoints --------------------------------------------------------------------------------
    def _save_checkpoint(self, cur_epoch: int, is_best: bool = False) -> None:
        if not is_main_process():
            return
        model = self.unwrap_dist_model(self.model)
        state = {
            "model": checkpoint_state_dict(model),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": cur_epoch,
            "best_agg_metric": self.best_agg_metric,
            "best_epoch": self.best_epoch,
            "config": self.config.to_dict(),
            "rng": rng_states(),
        }
        latest = self.output_dir / "checkpoint_latest.pth"
        atomic_save(state, latest)
        logger.info("Saved epoch %d checkpoint (trained parameters only) to %s", cur_epoch, latest)
        if is_best and self.checkpoint_format == "bundle":
            self.save_bundle(model, BEST_BUNDLE, self.best_metrics)
        elif is_best:
            atomic_save(state, self.output_dir / "checkpoint_best.pth")

    def save_bundle(self, model: torch.nn.Module, name: str, metrics: Any) -> None:
        """``model.save_pretrained`` into the job folder, the card naming the run's training datasets and splits."""
        datasets = ", ".join(self.config.datasets_cfg)
        training_data = f"datasets {datasets}, splits {list(self.config.run_cfg.get('train_splits', []))}"
        model.save_pretrained(self.output_dir / name, metrics=metrics, training_data=training_data)

    def _reload_best_model(self, model: torch.nn.Module) -> torch.nn.Module:
        path = self.output_dir / (BEST_BUNDLE if self.checkpoint_format == "bundle" else "checkpoint_best.pth")
        logger.info("Loading the best checkpoint from %s", path)
        model.load_checkpoint(str(path))
        return model

    def _load_checkpoint(self, url_or_filename: str) -> None:
        """Resume: model (trainable parameters), optimizer, scaler, epoch, best metric, RNG states."""
        model = self.unwrap_dist_model(self.model)
        model.load_checkpoint(url_or_filename)
        checkpoint = read_checkpoint(url_or_filename, key="resume_ckpt_path")
        missing = [key for key in ("optimizer", "epoch") if key not in checkpoint]
        if missing:
            raise CheckpointError(url_or_filename, f"cannot resume from it: no {missing} (a model-only checkpoint? "
                                                   "load it with model.finetuned instead)")
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch = checkpoint["epoch"] + 1
        self.best_agg_metric = checkpoint.get("best_agg_metric", float("-inf"))
        self.best_epoch = checkpoint.get("best_epoch", -1)
        if "rng" in checkpoint:
            set_rng_states(checkpoint["rng"])
        logger.info("Resumed from %s: continuing at epoch %d", url_or_filename, self.start_epoch)


def checkpoint_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's own choice (``MedBLIP.checkpoint_state_dict``), else its trainable parameters."""
    if hasattr(model, "checkpoint_state_dict"):
        return model.checkpoint_state_dict()
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def open_summary_writer(log_dir: Path) -> Any:
    """``torch.utils.tensorboard.SummaryWriter`` on ``log_dir``, imported here: only runs that ask need the
    ``tensorboard`` package, and ``import lavis_medblip`` stays light."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir))


def make_unique_dir(parent: Path, name: str) -> Path:
    """Create ``parent/name``, or ``parent/name_2``, ``_3``, ... when taken (atomically: ``mkdir`` fails if it exists)."""
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in itertools.count(1):
        candidate = parent / (name if attempt == 1 else f"{name}_{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def rng_states() -> dict[str, Any]:
    """torch, numpy and Python RNG states as tensors and plain values (what ``weights_only`` loads)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore :func:`rng_states` (or the numpy tuple that checkpoints before 2026-12-04 hold)."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    python_state = states["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
