"""LAVIS finds the plugin by itself, as LAVIS users run it: programs that import only LAVIS.

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

from lavis.common.registry import registry

import lavis_medblip_autoregister

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
import json
from lavis.common.registry import registry  # imports LAVIS: only the start-up hook can have registered anything

print(json.dumps({kind: sorted(f"{name}={cls.__module__}" for name, cls in table.items()
                               if not cls.__module__.startswith("lavis."))
                  for kind, table in registry.mapping.items() if kind.endswith("_name_mapping")}))
"""


def plugin_classes_registered_here() -> dict[str, list[str]]:
    """What ``import lavis_medblip`` (conftest) registered in this process, as :data:`PLUGIN_REGISTRY` prints it."""
    return {kind: sorted(f"{name}={cls.__module__}" for name, cls in table.items() if cls.__module__.startswith(PLUGIN))
            for kind, table in registry.mapping.items() if kind.endswith("_name_mapping")}


def test_a_program_that_imports_only_lavis_finds_every_model_builder_processor_task_and_runner(tmp_path):
    found = json.loads(run_python(PLUGIN_REGISTRY, tmp_path).stdout)

    assert found == plugin_classes_registered_here()
    assert {"medblip=lavis_medblip.models.medblip", "medblip_caption=lavis_medblip.models.caption_2d"} <= set(
        found["model_name_mapping"])
    assert "medblip_runner=lavis_medblip.runners.runner" in found["runner_name_mapping"]
    assert {"adni", "brain_mri", "m3d_vqa", "roco"} <= {entry.split("=")[0] for entry in found["builder_name_mapping"]}


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
