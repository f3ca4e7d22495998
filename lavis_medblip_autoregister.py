"""LAVIS finds lavis_medblip by itself: the finder that ``lavis_medblip_autoregister.pth`` installs at start-up.

``pip install .`` / ``pip install -e .`` put ``lavis_medblip_autoregister.pth`` into site-packages
(see ``setup.py``), so every interpreter of the environment runs :func:`install_unless_disabled`
at start-up. That only puts :class:`LavisPluginFinder` first on ``sys.meta_path``; nothing else is
imported (this runs in every Python process; ``benchmarks/startup.py`` measures the cost). The finder

* lets ``import lavis`` run as usual (after :func:`lavis_medblip.compat.before_lavis`), then registers lavis_medblip's models, builders, processors,
  tasks and runner (:func:`lavis_medblip.registration.register_all`), so programs that import only
  LAVIS, such as LAVIS's own ``train.py`` / ``evaluate.py``, find them;
* serves ``lavis.train`` and ``lavis.evaluate`` (``python -m lavis.train …``) with the code of
  ``lavis_medblip.train`` / ``lavis_medblip.evaluate`` when LAVIS itself has no such modules
  (LAVIS's wheel ships none). Nothing is written into LAVIS's installed files.

``LAVIS_MEDBLIP_NO_AUTOREGISTER=1`` turns the start-up hook off; ``import lavis_medblip`` still registers.
"""
import os
import sys

TYPE_CHECKING = False  # typing itself costs milliseconds at start-up
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

DISABLE_VARIABLE = "LAVIS_MEDBLIP_NO_AUTOREGISTER"
#: ``lavis.<name>`` is served by ``lavis_medblip.<name>`` when LAVIS has no module of that name
LAUNCHER_MODULES = ("train", "evaluate")


class LavisPluginFinder:
    """A ``sys.meta_path`` finder for three names only: ``lavis``, ``lavis.train``, ``lavis.evaluate``."""

    def find_spec(
        self, fullname: str, path: "Sequence[str] | None" = None, target: "ModuleType | None" = None
    ) -> "ModuleSpec | None":
        if fullname == "lavis":
            return self._lavis_then_register(path, target)
        package, _, name = fullname.partition(".")
        if package == "lavis" and name in LAUNCHER_MODULES:
            return self._launcher(fullname, name, path, target)
        return None

    def _found_by_others(self, fullname: str, path, target) -> "ModuleSpec | None":
        """The spec the import system would find without this finder."""
        for finder in sys.meta_path:
            if isinstance(finder, LavisPluginFinder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def _lavis_then_register(self, path, target) -> "ModuleSpec | None":
        spec = self._found_by_others("lavis", path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        # Imported here, while LAVIS is not yet in sys.modules: lavis_medblip/__init__ then only installs this finder.
        from lavis_medblip import compat

        def exec_then_register(module: "ModuleType") -> None:
            del loader.exec_module  # back to the loader's own method; this loader instance serves this import only
            compat.before_lavis()  # what LAVIS 1.0.2 needs of a newer transformers to import (a no-op on the lock's)
            loader.exec_module(module)
            try:
                from lavis_medblip.registration import register_all

                register_all()
            except Exception as error:  # every LAVIS program of the environment gets here: say why, and the way out
                if hasattr(error, "add_note"):  # Python 3.11+
                    error.add_note(f"while registering lavis_medblip into LAVIS (set {DISABLE_VARIABLE}=1 to skip)")
                raise

        loader.exec_module = exec_then_register
        return spec

    def _launcher(self, fullname: str, name: str, path, target) -> "ModuleSpec | None":
        if self._found_by_others(fullname, path, target) is not None:
            return None  # LAVIS's own module wins
        import importlib.util

        plugin = importlib.util.find_spec(f"lavis_medblip.{name}")
        return importlib.util.spec_from_file_location(fullname, plugin.origin)


def install() -> None:
    """Put :class:`LavisPluginFinder` first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, LavisPluginFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, LavisPluginFinder())


def install_unless_disabled() -> None:
    """What the ``.pth`` file runs at interpreter start: :func:`install`, unless ``LAVIS_MEDBLIP_NO_AUTOREGISTER=1``."""
    if os.environ.get(DISABLE_VARIABLE, "") in ("", "0"):
        install()
