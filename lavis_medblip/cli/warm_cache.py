"""Fill the preprocessed-volume cache: ``python -m lavis_medblip.warm_cache --cfg-path <project>.yaml [--workers N]``.

Builds the project's datasets as ``lavis_medblip.train`` does (the same YAML and ``--options``) and runs
every image once through its split's processor, in ``N`` DataLoader workers. Resampling and template
registration then happen here, in parallel and once, rather than inside the first epoch of training
(and once per rank). Only processors with a ``cache_dir`` are warmed; the cache is safe to share
between processes, two ``warm_cache`` runs on one directory at once included (see
``processors/volume_cache.py``). An image that fails is counted and named in
the log; training then applies the dataset's ``on_error``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from lavis_medblip.cli.arguments import config_parser, parse_config_args

# LAVIS and torch load where used, after the command line is checked (cli/arguments.py says why).

logger = logging.getLogger(__name__)


class _Preprocess:
    """``(processor, path)`` pairs, a map-style dataset; an item is ``None`` or the error that ``path`` raised."""

    def __init__(self, jobs: Sequence[tuple[Any, Path]]):
        self.jobs = list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> str | None:
        processor, path = self.jobs[index]
        try:
            processor.preprocess(str(path))
        except (OSError, ValueError, RuntimeError) as error:
            return f"{path}: {type(error).__name__}: {error}"
        return None


def cached_images(datasets: dict[str, dict[str, Any]]) -> list[tuple[Any, Path]]:
    """Every (processor, image) pair whose processor caches, each cache entry once."""
    jobs, seen = [], set()
    for splits in datasets.values():
        for dataset in splits.values():
            processor = getattr(dataset, "vis_processor", None)
            cache = getattr(processor, "cache", None)
            if cache is None:
                continue
            for _, path in getattr(dataset, "records", []):
                key = (str(cache.cache_dir), cache.settings_key, str(path))
                if key not in seen:
                    seen.add(key)
                    jobs.append((processor, path))
    return jobs


def warm_cache(datasets: dict[str, dict[str, Any]], workers: int = 1) -> dict[str, Any]:
    """Preprocess every cached image of ``datasets`` (LAVIS's ``{name: {split: dataset}}``).

    Returns ``{"images": n, "failed": [messages]}``.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    jobs = cached_images(datasets)
    loader = DataLoader(_Preprocess(jobs), batch_size=None, num_workers=workers)
    failed = [error for error in tqdm(loader, total=len(jobs), desc="preprocessing volumes", unit="volume") if error]
    for message in failed:
        logger.warning("could not preprocess %s", message)
    if failed:
        logger.warning("%d of %d images failed to preprocess (training applies the dataset's on_error)",
                       len(failed), len(jobs))
    return {"images": len(jobs), "failed": failed}


def main(argv: Sequence[str] | None = None) -> None:
    parser = config_parser("python -m lavis_medblip.warm_cache", __doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)")
    args = parse_config_args(parser, argv)
    import torch
    from lavis.common.config import Config
    from lavis.common.logger import setup_logger
    import lavis.tasks as tasks

    setup_logger()
    cfg = Config(args)  # reads cfg_path and options
    datasets = tasks.setup_task(cfg).build_datasets(cfg)
    torch.set_num_threads(1)  # the workers do the work
    result = warm_cache(datasets, workers=args.workers)
    print(f"preprocessed {result['images']} volumes, {len(result['failed'])} failed")


if __name__ == "__main__":
    main()
