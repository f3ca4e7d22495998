"""Import costs: the data-preparation path and the commands' --help stay free of LAVIS/torch; the LAVIS
registration is unchanged.

Each check runs in a fresh interpreter, since this test process has imported everything already.
"""
from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dataset_builders
import lavis_medblip.annotations

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("lavis", "torch", "torchvision", "transformers")


def run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter from the repository root; return its stdout (fail on error)."""
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def heavy_modules_after(imports: list[str]) -> list[str]:
    """Which of :data:`HEAVY` a fresh interpreter has loaded after importing ``imports``."""
    code = "import importlib, json, sys\n"
    code += "".join(f"importlib.import_module({name!r})\n" for name in imports)
    code += f"print(json.dumps([name for name in {HEAVY!r} if name in sys.modules]))\n"
    return json.loads(run_python(code))


def data_modules() -> list[str]:
    return sorted(f"lavis_medblip.annotations.{info.name}" for info in pkgutil.iter_modules(lavis_medblip.annotations.__path__))


def cohort_cli_modules() -> list[str]:
    names = [info.name for info in pkgutil.iter_modules(dataset_builders.__path__)]
    # The simulator draws its scans with torch; it is checked separately below.
    return sorted(f"dataset_builders.{name}" for name in names if name != "simulate_cohort")


def test_data_preparation_modules_import_without_lavis_or_torch():
    modules = ["lavis_medblip", *data_modules(), *cohort_cli_modules()]
    assert {"lavis_medblip.annotations.schema", "dataset_builders.adni", "dataset_builders.m3d_vqa_ad"} <= set(modules)
    assert heavy_modules_after(modules) == []


def test_the_cohort_simulator_imports_torch_but_not_lavis():
    assert heavy_modules_after(["dataset_builders.simulate_cohort"]) == ["torch"]


#: The installed commands (setup.py's console scripts), as ``python -m`` runs them.
COMMANDS = ("lavis_medblip.train", "lavis_medblip.evaluate", "lavis_medblip.predict", "lavis_medblip.export",
            "lavis_medblip.warm_cache", "lavis_medblip.app")


def heavy_modules_after_command(module: str, arguments: list[str]) -> tuple[int, str, list[str]]:
    """Run ``python -m module *arguments`` in a fresh interpreter until it exits: (exit code, what it printed,
    which of :data:`HEAVY` it loaded)."""
    code = f"""
        import contextlib, io, json, runpy, sys
        sys.argv = [{module!r}, *{arguments!r}]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            try:
                runpy.run_module({module!r}, run_name="__main__")
                code = 0
            except SystemExit as exit:
                code = exit.code
        print(json.dumps([code, printed.getvalue(), [name for name in {HEAVY!r} if name in sys.modules]]))
    """
    return tuple(json.loads(run_python(code)))


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_answers_help_before_loading_lavis_or_torch(module):
    code, printed, heavy = heavy_modules_after_command(module, ["--help"])
    assert (code, heavy) == (0, [])
    assert printed.startswith(f"usage: python -m {module}")


def test_a_wrong_path_is_named_before_lavis_or_torch_load(tmp_path):
    scan, missing, not_yaml = tmp_path / "scan.nii.gz", tmp_path / "missing", tmp_path / "eval.yaml"
    scan.write_bytes(b"")
    not_yaml.write_text("run: {task: [unclosed\n")
    for module, arguments, named in [
        ("lavis_medblip.train", ["--cfg-path", f"{missing}.yaml"], f"--cfg-path {missing}.yaml: no such file"),
        ("lavis_medblip.warm_cache", ["--cfg-path", f"{missing}.yaml"], f"--cfg-path {missing}.yaml: no such file"),
        ("lavis_medblip.evaluate", ["--cfg-path", str(not_yaml)], f"--cfg-path {not_yaml}: not a YAML file"),
        ("lavis_medblip.predict", ["--model-type", "demo", "--image", f"{missing}.nii.gz"],
         f"{missing}.nii.gz: no such file or directory"),
        ("lavis_medblip.predict", ["--model-type", "demo", "--checkpoint", f"{missing}.pth", "--image", str(scan)],
         f"--checkpoint {missing}.pth: no such file or folder"),
        ("lavis_medblip.app", ["--checkpoint", f"{missing}.pth"], f"--checkpoint {missing}.pth: no such file or folder"),
    ]:
        code, printed, heavy = heavy_modules_after_command(module, arguments)
        assert (code, heavy) == (2, []), module
        assert named in printed

REGISTRY_SNAPSHOT = """
from lavis.common.registry import registry
from lavis.models import model_zoo

snapshot = {
    kind: sorted(f"{name}={cls.__module__}.{cls.__qualname__}" for name, cls in table.items()
                 if cls.__module__.startswith("lavis_medblip"))
    for kind, table in registry.mapping.items() if kind.endswith("_name_mapping")
}
snapshot["model_zoo"] = sorted(name for name in model_zoo.model_zoo if name.startswith("medblip"))
print(json.dumps(snapshot, sort_keys=True))
"""


def registry_after(statements: str) -> dict[str, list[str]]:
    """What lavis_medblip has registered into LAVIS after running ``statements`` in a fresh interpreter."""
    return json.loads(run_python("import json\n" + textwrap.dedent(statements) + REGISTRY_SNAPSHOT))


@pytest.fixture(scope="module")
def eager_registry() -> dict[str, list[str]]:
    # LAVIS imported first: ``import lavis_medblip`` registers on the spot, as it always has.
    snapshot = registry_after("import lavis\nimport lavis_medblip\n")
    assert "medblip=lavis_medblip.models.medblip.MedBLIP" in snapshot["model_name_mapping"]
    assert "mri_volume_eval=lavis_medblip.processors.volume.MriVolumeEvalProcessor" in snapshot["processor_name_mapping"]
    assert snapshot["builder_name_mapping"] and snapshot["task_name_mapping"] and snapshot["runner_name_mapping"]
    return snapshot


@pytest.mark.parametrize(
    "statements",
    [
        "import lavis_medblip\nimport lavis",  # the plugin first, LAVIS after
        "import lavis_medblip\nlavis_medblip.models",  # a subpackage reached as an attribute
        "import lavis_medblip.annotations.schema\nimport lavis_medblip.processors.readers",  # light module, then a registering one
        "import lavis_medblip.datasets.m3d_vqa",  # a module that imports LAVIS itself, deep inside a subpackage
        "import lavis_medblip.tasks.vqa",
    ],
    ids=["plugin-then-lavis", "attribute", "data-then-processors", "m3d_vqa-first", "vqa-task-first"],
)
def test_the_registry_is_the_same_whatever_is_imported_first(eager_registry, statements):
    assert registry_after(statements) == eager_registry
