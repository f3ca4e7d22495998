"""What ``lavis_medblip.train`` and ``lavis_medblip.evaluate`` share, following LAVIS's own
``train.py`` / ``evaluate.py``: job id, config (registered defaults < project YAML < ``--options``),
distributed init, seeds, logger, task → datasets → model → the runner named by the config.

Differences from LAVIS's scripts, all for running anywhere: the process group uses gloo when
there is no CUDA; a relative ``output_dir`` resolves under the working directory. (Relative storage
paths resolve against ``run.cache_root`` whichever script runs: see
:class:`lavis_medblip.registration.RunCacheRoot`.)
"""
from __future__ import annotations

import datetime
import logging
import os
import random
from typing import TYPE_CHECKING, Any, Sequence

from lavis_medblip.cli.arguments import config_parser, parse_config_args

if TYPE_CHECKING:
    from lavis.common.config import Config

# LAVIS and torch load where used, after the command line is checked (cli/arguments.py says why).


def init_distributed_mode(run_cfg: Any) -> None:
    """LAVIS's ``init_distributed_mode`` with gloo (and no ``cuda.set_device``) when there is no GPU."""
    import torch
    import torch.distributed as dist
    from lavis.common.dist_utils import setup_for_distributed

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        run_cfg.distributed = False
        return
    run_cfg.rank, run_cfg.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    run_cfg.gpu = int(os.environ.get("LOCAL_RANK", 0))
    run_cfg.distributed = True
    use_cuda = torch.cuda.is_available() and str(run_cfg.get("device", "cuda")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(run_cfg.gpu)
    else:
        run_cfg.device = "cpu"
    run_cfg.dist_backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend=run_cfg.dist_backend, init_method=run_cfg.get("dist_url", "env://"),
                            world_size=run_cfg.world_size, rank=run_cfg.rank, timeout=datetime.timedelta(hours=2))
    dist.barrier()
    setup_for_distributed(run_cfg.rank == 0)


def setup_seeds(config: Config) -> None:
    import numpy as np
    import torch
    from lavis.common.dist_utils import get_rank

    seed = int(config.run_cfg.seed) + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_runner(argv: Sequence[str] | None, prog: str, description: str):
    """Parse the command line and build (runner, config) exactly as LAVIS's scripts do."""
    args = parse_config_args(config_parser(prog, description), argv)
    import torch
    import torch.distributed as dist

    import lavis.common.optims  # noqa: F401  (registers LAVIS's lr schedulers)
    import lavis.tasks as tasks
    from lavis.common.config import Config
    from lavis.common.logger import setup_logger
    from lavis.common.registry import registry

    import lavis_medblip  # noqa: F401  (registers models, processors, builders, tasks, runners)

    cfg = Config(args)
    if not torch.cuda.is_available() and str(cfg.run_cfg.get("device", "cuda")).startswith("cuda"):
        logging.warning("no CUDA device: running on CPU")
        cfg.run_cfg.device = "cpu"
    init_distributed_mode(cfg.run_cfg)
    job_id = [datetime.datetime.now().strftime("%Y%m%d%H%M%S")]  # LAVIS's now() has 10-minute resolution
    if cfg.run_cfg.distributed:  # one output folder even when ranks start on either side of a second
        dist.broadcast_object_list(job_id, src=0)
    job_id = job_id[0]
    setup_seeds(cfg)
    setup_logger()
    cfg.run_cfg.output_dir = os.path.abspath(os.path.expanduser(cfg.run_cfg.output_dir))
    cfg.pretty_print()

    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    model = task.build_model(cfg)
    runner_cls = registry.get_runner_class(cfg.run_cfg.get("runner", "medblip_runner"))
    if runner_cls is None:
        raise KeyError(f"runner {cfg.run_cfg.get('runner')!r} is not registered")
    return runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets), cfg
