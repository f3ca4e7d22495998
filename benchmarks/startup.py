"""What the start-up hook (``lavis_medblip_autoregister.pth``) adds to ``python -c pass``.
Bare virtualenvs started interleaved (the variants: README, Design notes).
Usage: ``.venv/bin/python benchmarks/startup.py [--runs 60]``.
"""
from __future__ import annotations

import argparse
import os
import py_compile
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOOK_FILES = ("lavis_medblip_autoregister.pth", "lavis_medblip_autoregister.py")
DISABLE = {"LAVIS_MEDBLIP_NO_AUTOREGISTER": "1"}


def bare_venv(root: Path) -> Path:
    """A virtualenv without pip: its site-packages holds nothing but what we copy into it."""
    venv.create(root, with_pip=False, symlinks=True)
    return root / "bin" / "python"


def site_packages(python: Path) -> Path:
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    return Path(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip())


def start_once(python: Path, env: dict[str, str]) -> float:
    """Wall time (ms) of one ``python -c pass``, process start to exit."""
    start = time.perf_counter()
    subprocess.run([str(python), "-c", "pass"], env=env, check=True)
    return (time.perf_counter() - start) * 1000


def compare(variants: dict[str, tuple[Path, dict[str, str]]], runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, (python, env) in variants.items():  # warm the page cache and the .pyc files first
        start_once(python, env)
    for _ in range(runs):
        for name, (python, env) in variants.items():
            times[name].append(start_once(python, env))
    return times


def report(title: str, times: dict[str, list[float]], baseline: str) -> None:
    print(f"\n{title}")
    print(f"{'variant':<50}{'median ms':>10}{'p25':>8}{'p75':>8}{'vs ' + baseline:>18}")
    base = statistics.median(times[baseline])
    for name, values in times.items():
        q1, median, q3 = statistics.quantiles(values, n=4)
        delta = "" if name == baseline else f"{median - base:+.2f} ms"
        print(f"{name:<50}{median:>10.2f}{q1:>8.2f}{q3:>8.2f}{delta:>18}")


def hook_import_time(python: Path, env: dict[str, str]) -> str:
    """``-X importtime``'s line for the hook's module (self and cumulative microseconds)."""
    result = subprocess.run([str(python), "-X", "importtime", "-c", "pass"], env=env, capture_output=True, text=True)
    lines = [line for line in result.stderr.splitlines() if re.search(r"\blavis_medblip_autoregister$", line)]
    return lines[0].strip() if lines else "(not imported)"


def venv_with_hook(root: Path, compiled: bool) -> Path:
    python = bare_venv(root)
    target = site_packages(python)
    for name in HOOK_FILES:
        shutil.copy(REPO / name, target / name)
    if compiled:
        py_compile.compile(str(target / HOOK_FILES[1]), doraise=True)
    return python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60, help="starts per variant (default 60)")
    args = parser.parse_args()
    env = {key: value for key, value in os.environ.items() if key not in DISABLE}
    no_bytecode = {**env, "PYTHONDONTWRITEBYTECODE": "1"}

    with tempfile.TemporaryDirectory() as scratch:
        without_hook = bare_venv(Path(scratch) / "without")
        compiled = venv_with_hook(Path(scratch) / "compiled", compiled=True)
        uncompiled = venv_with_hook(Path(scratch) / "uncompiled", compiled=False)
        times = compare({
            "bare venv": (without_hook, env),
            "+ hook (.pyc, as pip installs it)": (compiled, env),
            "+ hook, no .pyc": (uncompiled, no_bytecode),
            "+ hook (.pyc), LAVIS_MEDBLIP_NO_AUTOREGISTER=1": (compiled, {**env, **DISABLE}),
        }, args.runs)
        report(f"python -c pass, {args.runs} runs each (Python {sysconfig.get_python_version()}, "
               f"{os.cpu_count()} cores)", times, "bare venv")
        print("importtime of the hook (us, self | cumulative):", hook_import_time(compiled, env))

    this_env = Path(sys.executable)
    installed = (site_packages(this_env) / HOOK_FILES[0]).is_file()
    print(f"\nthis environment ({this_env}; hook {'installed' if installed else 'NOT installed'}):",
          hook_import_time(this_env, env))


if __name__ == "__main__":
    main()
