"""What the web app does, without the web: take an uploaded scan and EHR fields, diagnose it one model pass at
a time, and keep the results (scan for the viewer, report, relevance map) for the page to fetch.

The model is the predict CLI's (:func:`lavis_medblip.inference.load_config`, :func:`~lavis_medblip.inference.load_model`,
:class:`~lavis_medblip.inference.Predictor`): the same case gives the same probabilities in both.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from lavis_medblip.app.uploads import DEFAULT_MAX_UPLOAD_MB, VIEWER_SUFFIXES, InputProblem, unpack_zip, upload_suffix

KEPT_RESULTS = 32  # the oldest results' files are deleted beyond this many
MAKE_DEMO_HINT = ("no model loaded: the default is the demo model, whose checkpoint is missing; run `make demo` "
                  "first (about 12 minutes on a CPU), or start the app with --model-type tiny (untrained weights)")


class NoModel(InputProblem):
    def __init__(self, message: str = MAKE_DEMO_HINT) -> None:
        super().__init__(message, status=503)


def peak_mm(image: Any) -> list[float]:
    """World coordinates (mm) of the largest voxel of a NIfTI image."""
    import numpy as np

    data = np.asanyarray(image.dataobj)
    voxel = np.unravel_index(int(np.argmax(data)), data.shape)
    return [round(float(value), 2) for value in (image.affine @ np.array([*voxel, 1.0]))[:3]]


def relevance_methods() -> tuple[str, ...]:
    from lavis_medblip.models.explain import METHODS

    return METHODS


@dataclass
class Result:
    """One diagnosed scan, kept for the page's follow-up requests."""

    id: str
    folder: Path
    filename: str
    scan: Path  # what the processor read (a file or a DICOM folder)
    text: str
    volume: Any  # the processed (1, S, S, S) tensor, for the report
    probabilities: dict[str, float]
    prediction: str
    answer: str
    explanation: str | None = None
    warning: str = ""
    relevance: Path | None = None
    top_regions: list[tuple[str, float]] = field(default_factory=list)
    relevance_method: str | None = None
    relevance_cube: Any = None  # the map on the model input's grid (the report's overlay)
    relevance_peak_mm: list[float] | None = None  # world coordinates of the map's maximum (the viewer's crosshair)
    timings: dict[str, float] = field(default_factory=dict)
    example: str | None = None
    _viewer: Path | None = None

    def response(self) -> dict[str, Any]:
        return {"id": self.id, "filename": self.filename, "text": self.text, "prediction": self.prediction,
                "answer": self.answer, "probabilities": self.probabilities, "explanation": self.explanation,
                "warning": self.warning or None, "top_regions": [[name, share] for name, share in self.top_regions],
                "relevance_id": self.id if self.relevance is not None else None,
                "relevance_method": self.relevance_method, "relevance_peak_mm": self.relevance_peak_mm,
                "timings": self.timings, "example": self.example,
                "scan_url": f"api/scan/{self.id}", "scan_name": self.viewer_name,
                "report_url": f"api/report/{self.id}",
                "relevance_url": f"api/relevance/{self.id}" if self.relevance is not None else None}

    @property
    def viewer_name(self) -> str:
        suffix = next((s for s in VIEWER_SUFFIXES if self.scan.name.lower().endswith(s)), None)
        return f"scan{suffix}" if suffix else "scan.nii.gz"


Returned = TypeVar("Returned")


@dataclass
class ModelInfo:
    model_type: str | None
    checkpoint: str | None
    problem: str | None = None  # why no model is loaded
    no_relevance: str | None = None  # why there are no relevance maps


class Service:
    """The app's state: one predictor, one model-pass queue, the kept results.

    ``predictor`` None serves the page and every request that needs no model; a prediction is then an HTTP 503
    saying how to get a model (:data:`MAKE_DEMO_HINT`). ``relevance`` (``explain_scan`` of
    :mod:`lavis_medblip.relevance`) makes the relevance map; None leaves it out.
    """

    def __init__(self, predictor: Any | None, info: ModelInfo, *, cohort: Path | None = None,
                 max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB * 2**20, workdir: Path | None = None,
                 relevance: Callable[..., Any] | None = None, relevance_method: str = "gradient") -> None:
        self.predictor, self.info = predictor, info
        self.cohort = cohort if cohort is not None and (cohort / "test.jsonl").is_file() else None
        self.max_upload_bytes = max_upload_bytes
        self.relevance, self.relevance_method = relevance, relevance_method
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="medblip-app-")) if workdir is None else workdir
        self.results: OrderedDict[str, Result] = OrderedDict()
        self._results_lock = threading.Lock()
        # One job at a time (reading a scan, a model pass, a relevance map), in arrival order: a queue with one worker.
        self._model_queue = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medblip-model")
        self._in_flight, self.max_in_flight, self.jobs_done = 0, 0, 0
        self._examples: list[dict[str, Any]] | None = None

    def close(self) -> None:
        self._model_queue.shutdown(wait=True, cancel_futures=True)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        predictor = self.predictor
        calibration = getattr(getattr(predictor, "model", None), "calibration", None)
        return {"ready": predictor is not None, "problem": self.info.problem, "model_type": self.info.model_type,
                "checkpoint": self.info.checkpoint, "classes": list(predictor.classes) if predictor else [],
                "answers": list(predictor.answers) if predictor else [],
                "explain_question": predictor.explain_question if predictor else None,
                "calibrated": bool(calibration is not None and not calibration.is_identity),
                "relevance": self.relevance is not None, "no_relevance": self.info.no_relevance,
                "relevance_methods": list(relevance_methods()) if self.relevance else [],
                "relevance_method": self.relevance_method if self.relevance else None,
                "examples": self.cohort is not None,
                "max_upload_mb": self.max_upload_bytes / 2**20, "queue_jobs": self.jobs_done,
                "max_concurrent_queue_jobs": self.max_in_flight}

    # ---- the model queue ------------------------------------------------------------------------------

    def _serialised(self, work: Callable[[], Returned]) -> Callable[[], Returned]:
        def run() -> Returned:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            try:
                return work()
            finally:
                self._in_flight -= 1
                self.jobs_done += 1
        return run

    async def on_model(self, work: Callable[[], Returned], timings: dict[str, float] | None = None,
                       step: str = "") -> Returned:
        """Run ``work`` on the queue's one worker; waits its turn without blocking the server.

        With ``timings``, adds the seconds ``work`` ran to ``timings[step]`` and the seconds it waited to
        ``timings["queue"]``.
        """
        submitted = time.perf_counter()
        ran: list[float] = []

        def timed() -> Returned:
            start = time.perf_counter()
            try:
                return work()
            finally:
                ran[:] = [start - submitted, time.perf_counter() - start]

        try:
            return await asyncio.wrap_future(self._model_queue.submit(self._serialised(timed)))
        finally:
            if timings is not None and ran:
                timings["queue"] = timings.get("queue", 0.0) + ran[0]
                timings[step] = timings.get(step, 0.0) + ran[1]

    # ---- requests -------------------------------------------------------------------------------------

    def new_folder(self) -> tuple[str, Path]:
        result_id = uuid.uuid4().hex[:16]
        folder = self.workdir / result_id
        folder.mkdir(parents=True)
        return result_id, folder

    def scan_in_upload(self, upload: Path, filename: str, folder: Path) -> Path:
        """The path the processor reads for an upload saved at ``upload`` (a .zip is unpacked first)."""
        if upload_suffix(filename) == ".zip":
            return unpack_zip(upload, folder / "unpacked", filename, self.max_upload_bytes)
        return upload

    async def diagnose(self, scan: Path, filename: str, text: str, folder: Path, result_id: str, *,
                       explain: bool = False, relevance: bool = True, method: str | None = None,
                       example: str | None = None, started: float | None = None) -> Result:
        """Read, diagnose and (when available) explain one scan; raises :class:`InputProblem` for bad input."""
        from starlette.concurrency import run_in_threadpool

        from lavis_medblip.inference import Case

        predictor = self.predictor
        if predictor is None:
            raise NoModel(self.info.problem or MAKE_DEMO_HINT)
        method = method or self.relevance_method
        if method not in relevance_methods():
            raise InputProblem(f"unknown relevance method {method!r}; choose from {list(relevance_methods())}")
        started = time.perf_counter() if started is None else started
        # reading counts from the request's start (the upload saved, a .zip unpacked)
        timings: dict[str, float] = {"read": time.perf_counter() - started, "queue": 0.0}
        case = Case(case_id=result_id, image=filename, path=scan, text=text)
        # Reading goes through the queue too: the processors collect their warnings with warnings.catch_warnings,
        # which is process-wide state that two threads must not enter at once.
        read = await self.on_model(lambda: predictor.read(case), timings, "read")
        if read.error is not None:
            raise InputProblem(f"{filename}: {read.error.problem.replace(str(scan), filename)}")

        asking = replace(predictor, explain=True) if explain else predictor
        (prediction,) = await self.on_model(lambda: asking.predict([read.volume], [text]), timings, "model")

        result = Result(id=result_id, folder=folder, filename=filename, scan=scan, text=text, volume=read.volume,
                        probabilities=prediction.probabilities, prediction=prediction.code, answer=prediction.answer,
                        explanation=prediction.explanation, warning=read.warning, example=example)
        if relevance and self.relevance is not None:
            try:
                explained = await self.on_model(lambda: self.relevance(predictor, scan, text, method=method,
                                                                       prediction=prediction),
                                                timings, "relevance")
            except ValueError as error:  # the diagnosis stands; the page says why there is no map
                result.warning = "; ".join(filter(None, [result.warning, f"no relevance map: {error}"]))
            else:
                result.relevance = folder / "relevance.nii.gz"
                start = time.perf_counter()
                await run_in_threadpool(explained.image.to_filename, str(result.relevance))
                timings["relevance"] += time.perf_counter() - start
                result.top_regions = [(str(name), float(share)) for name, share in explained.top_regions]
                result.relevance_method = explained.method
                result.relevance_cube = explained.model_space
                result.relevance_peak_mm = peak_mm(explained.image)
        timings.setdefault("relevance", 0.0)
        timings["total"] = time.perf_counter() - started
        result.timings = {name: round(seconds, 4) for name, seconds in timings.items()}
        self.keep(result)
        return result

    def keep(self, result: Result) -> None:
        with self._results_lock:
            self.results[result.id] = result
            while len(self.results) > KEPT_RESULTS:
                _, old = self.results.popitem(last=False)
                shutil.rmtree(old.folder, ignore_errors=True)

    def result(self, result_id: str) -> Result:
        with self._results_lock:
            found = self.results.get(result_id)
        if found is None:
            raise InputProblem(f"no result {result_id!r} (results are kept for the last {KEPT_RESULTS} scans)", 404)
        return found

    # ---- what the page fetches ------------------------------------------------------------------------

    def viewer_file(self, result: Result) -> Path:
        """The scan as NiiVue reads it: the upload itself when NiiVue reads its format, else a NIfTI of it."""
        if result.scan.name.lower().endswith(VIEWER_SUFFIXES):
            return result.scan
        if result._viewer is None:
            import nibabel as nib
            import numpy as np

            from lavis_medblip.processors.readers import load_volume

            volume = load_volume(result.scan)
            data = np.asarray(volume.data)
            if getattr(volume, "channel_first", False) and data.ndim == 4:
                data = data[0]
            path = result.folder / "scan.nii.gz"
            nib.save(nib.Nifti1Image(data.astype(np.float32), volume.affine), path)
            result._viewer = path
        return result._viewer

    def report(self, result: Result) -> Path:
        from lavis_medblip.visualize import plot_volume_report

        path = result.folder / "report.png"
        if not path.exists():
            classes = list(result.probabilities)
            probabilities = [result.probabilities[code] for code in classes]
            title = f"{result.filename}: {result.prediction} ({result.answer}), p={max(probabilities):.2f}"
            overlay = None if result.relevance_cube is None else result.relevance_cube.float().cpu().numpy()
            plot_volume_report(result.volume[0].float().cpu().numpy(), probabilities, classes, path, title,
                               overlay)  # the relevance drawn on the slices through its maximum, as predict --report
        return path

    def examples(self) -> list[dict[str, Any]]:
        """Held-out-site subjects of the demo cohort, two per class (none without a cohort)."""
        if self.cohort is None:
            return []
        if self._examples is None:
            chosen: list[dict[str, Any]] = []
            for line in (self.cohort / "test.jsonl").read_text().splitlines():
                record = json.loads(line)
                if sum(1 for other in chosen if other["label"] == record["label"]) < 2:
                    ehr = record.get("ehr") or {}
                    chosen.append({"id": record["subject_id"], "label": record["label"], "site": record.get("site"),
                                   "text": record.get("text", ""), "image": record["image"],
                                   "ehr": {"age": ehr.get("age"), "sex": ehr.get("sex"),
                                           "education": ehr.get("education_years"), "mmse": ehr.get("mmse"),
                                           "cdr": ehr.get("cdr_global")}})
            self._examples = sorted(chosen, key=lambda example: ("NC", "MCI", "AD").index(example["label"])
                                    if example["label"] in ("NC", "MCI", "AD") else 9)
        return self._examples

    def example(self, example_id: str) -> dict[str, Any]:
        found = next((example for example in self.examples() if example["id"] == example_id), None)
        if found is None:
            raise InputProblem(f"no demo example {example_id!r}" + ("" if self.cohort else
                               " (no demo cohort: run `make demo` first)"), status=404)
        return found


def find_demo_checkpoint(root: Path = Path(".cache/demo")) -> Path | None:
    """The demo's trained image + text checkpoint: the calibrated one of its evaluation run when there, else the
    training run's latest (layout: :class:`lavis_medblip.cli.demo.Demo`)."""
    for run, name in (("image_text_eval", "checkpoint_calibrated.pth"), ("image_text", "checkpoint_latest.pth")):
        folder = root / "runs" / run
        candidates = sorted(folder.glob(f"*/{name}")) if folder.is_dir() else []
        if candidates:
            return candidates[-1]
    return None


def relevance_for(predictor: Any) -> tuple[Callable[..., Any] | None, str | None]:
    """``explain_scan`` of :mod:`lavis_medblip.relevance` for ``predictor``'s model, or None and why not (a model
    whose prompt has no image has no relevance map)."""
    from lavis_medblip.relevance import explain_scan

    if not predictor.model.config.uses_image:
        return None, "this model's prompt has no image, so it has no relevance map"
    return explain_scan, None


def load_service(model_type: str | None = None, checkpoint: str | None = None, options: Sequence[str] = (),
                 device: str | None = None, *, demo_root: Path = Path(".cache/demo"), bundle: str | None = None,
                 max_upload_mb: float | None = None, relevance: bool = True,
                 relevance_method: str = "gradient") -> Service:
    """The service of a model loaded as the predict CLI loads it.

    ``bundle``: a model bundle folder instead (:func:`~lavis_medblip.inference.model_source`). Neither: the demo model
    with :func:`find_demo_checkpoint`; when that is missing the service has no model (its ``info.problem`` says to run
    ``make demo``). A bad ``model_type``, ``options``, device, checkpoint or bundle is a ``ValueError``.
    """
    from lavis_medblip.annotations.schema import CLASS_NAMES
    from lavis_medblip.inference import Predictor, load_model, model_source, resolve_device
    from lavis_medblip.models.weights import CheckpointError

    if relevance_method not in relevance_methods():
        raise ValueError(f"unknown relevance method {relevance_method!r}; choose from {list(relevance_methods())}")

    limits = {} if max_upload_mb is None else {"max_upload_bytes": int(max_upload_mb * 2**20)}
    cohort = demo_root / "cohort"
    if model_type is None and bundle is None:
        found = find_demo_checkpoint(demo_root)
        if checkpoint is None and found is None:
            return Service(None, ModelInfo(None, None, MAKE_DEMO_HINT), cohort=cohort, **limits)
        model_type, checkpoint = "demo", checkpoint or str(found)
    device = resolve_device(device)
    try:
        config, checkpoint = model_source(model_type, checkpoint, bundle, options)
        model, volume_processor, text_processor = load_model(config, checkpoint, device)
    except CheckpointError as error:
        raise ValueError(f"cannot load the checkpoint {error}") from None
    predictor = Predictor(model, volume_processor, text_processor, list(CLASS_NAMES), device)
    explain_scan, no_relevance = relevance_for(predictor) if relevance else (None, "relevance maps are switched off")
    return Service(predictor, ModelInfo(model_type or config.model.model_type, checkpoint and str(checkpoint),
                                        no_relevance=no_relevance),
                   cohort=cohort, relevance=explain_scan, relevance_method=relevance_method, **limits)
