"""How fast each command answers ``--help`` and a path that does not exist, against ``import lavis`` (what every
command paid before it checked its command line first). Medians of interleaved runs, in seconds.
Usage: ``.venv/bin/python benchmarks/command_startup.py [--runs 5]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

MISSING = "/nonexistent/medblip-benchmark"
#: What is timed: a label and the arguments after ``python``.
RUNS = {
    "import lavis (for comparison)": ["-c", "import lavis"],
    **{f"{command} --help": ["-m", f"lavis_medblip.{command}", "--help"]
       for command in ("train", "evaluate", "predict", "export", "warm_cache", "app")},
    "train --cfg-path <missing>": ["-m", "lavis_medblip.train", "--cfg-path", f"{MISSING}.yaml"],
    "predict --image <missing>": ["-m", "lavis_medblip.predict", "--model-type", "demo", "--image", f"{MISSING}.nii"],
}


def seconds(arguments: list[str]) -> float:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    subprocess.run([sys.executable, *arguments], env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each (default: 5)")
    args = parser.parse_args()
    for arguments in RUNS.values():  # warm the page cache and the .pyc files first
        seconds(arguments)
    times: dict[str, list[float]] = {label: [] for label in RUNS}
    for _ in range(args.runs):
        for label, arguments in RUNS.items():
            times[label].append(seconds(arguments))
    print(f"{'command':<34}{'median s':>10}{'min':>8}{'max':>8}   ({args.runs} runs, {os.cpu_count()} cores)")
    for label, values in times.items():
        print(f"{label:<34}{statistics.median(values):>10.2f}{min(values):>8.2f}{max(values):>8.2f}")


if __name__ == "__main__":
    main()
