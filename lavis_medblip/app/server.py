"""The web app's HTTP side: a FastAPI REST API over :class:`~lavis_medblip.app.service.Service`, and the page.

``POST /api/predict`` takes a scan (multipart) and EHR fields or free text and answers with the diagnosis; the
page (``static/index.html`` + ``static/app.js``, NiiVue vendored under ``static/vendor/niivue``) calls it and
fetches the scan, the relevance map and the report by the answer's id. OpenAPI docs: ``/docs`` (Swagger UI
vendored under ``static/vendor/swagger-ui``).
"""
from __future__ import annotations

import shutil
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from lavis_medblip.app.service import Service
from lavis_medblip.app.uploads import InputProblem, ehr_text, upload_suffix
from lavis_medblip.processors.readers import scan_name

STATIC = Path(__file__).resolve().parent / "static"
CHUNK = 1 << 20


async def save_upload(upload: UploadFile, path: Path, limit: int) -> int:
    """Copy ``upload`` to ``path`` in chunks; :class:`InputProblem` (413) past ``limit`` bytes."""
    size = 0
    with open(path, "wb") as sink:
        while chunk := await upload.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise InputProblem(f"{upload.filename}: larger than the {limit / 2**20:.0f} MB upload limit", 413)
            sink.write(chunk)
    if size == 0:
        raise InputProblem(f"{upload.filename}: the file is empty")
    return size


def create_app(service: Service) -> FastAPI:
    """The app serving ``service``; the service is closed when the app shuts down."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPI(title="MedBLIP", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Diagnose a 3D brain MRI (NC / MCI / AD) from the scan and EHR text with MedBLIP. "
                              "One model pass at a time; results are kept for the last few scans.")
    app.state.service = service

    @app.exception_handler(InputProblem)
    async def input_problem(request: Request, error: InputProblem) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status)

    @app.middleware("http")
    async def upload_limit(request: Request, call_next):
        # Refuse an announced oversized upload before its body is parsed (the handler also counts the bytes).
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit() and int(length) > service.max_upload_bytes + CHUNK:
            return JSONResponse({"detail": f"upload of {int(length) / 2**20:.0f} MB is larger than the "
                                           f"{service.max_upload_bytes / 2**20:.0f} MB upload limit"}, status_code=413)
        return await call_next(request)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        # FastAPI's /docs with the vendored Swagger UI instead of its CDN copy: the docs work offline
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="MedBLIP API",
                                   swagger_js_url="static/vendor/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url="static/vendor/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url="data:,")

    @app.get("/api/status", summary="The model served, and what the app can do")
    async def status() -> dict[str, Any]:
        return service.status()

    @app.post("/api/predict", summary="Diagnose an uploaded scan with EHR fields or free text")
    async def predict(
        file: UploadFile = File(..., description="NIfTI (.nii, .nii.gz), MGH/MGZ, .npy, or a .zip of one DICOM series"),
        text: str = Form("", description="free EHR text; when given, the EHR fields are ignored"),
        age: str = Form(""), sex: str = Form("", description="F or M"), education: str = Form("", description="years"),
        mmse: str = Form(""), cdr: str = Form("", description="CDR global"),
        explain: bool = Form(False, description="also generate a free-text explanation"),
        relevance: bool = Form(True, description="compute the relevance map, when the app has relevance maps"),
        method: str = Form("", description="relevance method, gradient or attention (default: the app's)"),
    ) -> dict[str, Any]:
        started = time.perf_counter()
        filename = Path(file.filename or "upload").name
        upload_suffix(filename)
        sentence = ehr_text({"age": age, "sex": sex, "education": education, "mmse": mmse, "cdr": cdr}, text)
        result_id, folder = service.new_folder()
        try:
            upload = folder / f"upload{upload_suffix(filename)}"
            await save_upload(file, upload, service.max_upload_bytes)
            scan = service.scan_in_upload(upload, filename, folder)
            result = await service.diagnose(scan, filename, sentence, folder, result_id, explain=explain,
                                            relevance=relevance, method=method or None, started=started)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return result.response()

    @app.get("/api/examples", summary="Subjects of the demo cohort's held-out site, to try in one click")
    async def examples() -> list[dict[str, Any]]:
        return [{key: value for key, value in example.items() if key != "image"} for example in service.examples()]

    @app.post("/api/examples/{example_id}/predict", summary="Diagnose a demo-cohort example with its EHR text")
    async def predict_example(example_id: str, explain: bool = False, relevance: bool = True,
                              method: str = "") -> dict[str, Any]:
        example = service.example(example_id)
        scan = service.cohort / example["image"]
        result_id, folder = service.new_folder()
        try:
            result = await service.diagnose(scan, scan.name, example["text"], folder, result_id, explain=explain,
                                            relevance=relevance, method=method or None, example=example_id)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return result.response()

    @app.get("/api/scan/{result_id}", summary="The scan of a result, as the viewer reads it",
             response_class=FileResponse)
    async def scan(result_id: str) -> FileResponse:
        result = service.result(result_id)
        path = service.viewer_file(result)
        return FileResponse(path, media_type="application/octet-stream", filename=result.viewer_name)

    @app.get("/api/relevance/{result_id}", summary="The relevance map (NIfTI on the scan's grid)",
             response_class=FileResponse)
    async def relevance_map(result_id: str) -> FileResponse:
        result = service.result(result_id)
        if result.relevance is None:
            raise InputProblem(f"result {result_id} has no relevance map"
                               + ("" if service.relevance else " (this app computes none)"), status=404)
        return FileResponse(result.relevance, media_type="application/octet-stream",
                            filename=f"{scan_name(result.filename)}_relevance.nii.gz")

    @app.get("/api/report/{result_id}", summary="The PNG report: three slices (with the relevance map) and the class probabilities",
             response_class=FileResponse)
    async def report(result_id: str) -> FileResponse:
        result = service.result(result_id)
        from starlette.concurrency import run_in_threadpool

        path = await run_in_threadpool(service.report, result)
        return FileResponse(path, media_type="image/png", filename=f"{scan_name(result.filename)}_report.png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
