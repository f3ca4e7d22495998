"""The web app (``python -m lavis_medblip.app``) with the ``tiny`` model: its REST API, a live uvicorn server with
two concurrent clients, and the page in a real browser (Debian's chromium driven by Playwright)."""
from __future__ import annotations

import csv
import gzip
import json
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient

from lavis_medblip.annotations.ehr import describe_ehr
from lavis_medblip.app.server import create_app
from lavis_medblip.app.service import MAKE_DEMO_HINT, Service, find_demo_checkpoint, load_service
from lavis_medblip.assets import ICBM_T1
from lavis_medblip.cli.predict import main as predict_main
from test_predict_cli import write_dicom_series

EHR_FIELDS = {"age": "75", "sex": "F", "education": "12", "mmse": "24", "cdr": "0.5"}
EHR = describe_ehr({"age": 75, "sex": "F", "education_years": 12, "mmse": 24, "cdr_global": 0.5})
CHROMIUM = Path("/usr/bin/chromium")
#: Headless chromium in a closed network: WebGL through SwiftShader, and no calls home (refused connections).
CHROMIUM_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("uploads")
    image = nib.load(ICBM_T1)
    small = nib.Nifti1Image(np.asanyarray(image.dataobj)[::3, ::3, ::3], image.affine @ np.diag([3.0, 3.0, 3.0, 1.0]))
    nib.save(small, folder / "small.nii.gz")
    (folder / "garbage.nii.gz").write_bytes(b"this is not a NIfTI file")
    nib.save(nib.Nifti1Image(np.zeros((40, 40), np.float32), np.eye(4)), folder / "slice.nii.gz")
    np.save(folder / "five_d.npy", np.zeros((8, 8, 8, 2, 2), np.float32))
    write_dicom_series(folder / "dicom" / "S1", np.asanyarray(image.dataobj)[::6, ::6, ::6], spacing=6.0)
    with zipfile.ZipFile(folder / "series.zip", "w") as archive:
        for path in sorted((folder / "dicom" / "S1").iterdir()):
            archive.write(path, f"S1/{path.name}")
    return {"t1": ICBM_T1, "small": folder / "small.nii.gz", "garbage": folder / "garbage.nii.gz",
            "slice": folder / "slice.nii.gz", "five_d": folder / "five_d.npy", "zip": folder / "series.zip"}


@pytest.fixture(scope="module")
def service(checkpoint, tmp_path_factory):
    service = load_service("tiny", str(checkpoint), device="cpu", demo_root=tmp_path_factory.mktemp("no_demo"))
    yield service
    service.close()


@pytest.fixture(scope="module")
def client(service) -> TestClient:
    return TestClient(create_app(service))


@pytest.fixture(scope="module")
def server(service):
    """The app on a live uvicorn server at a free port of 127.0.0.1 (in a thread); yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    live = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning",
                                         lifespan="off"))
    thread = threading.Thread(target=live.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not live.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    live.should_exit = True
    thread.join(10)


def upload(path: Path, name: str | None = None) -> dict:
    return {"file": (name or path.name, path.read_bytes(), "application/octet-stream")}


def test_good_upload_answers_with_probabilities_timings_and_the_files_it_names(client, files):
    response = client.post("/api/predict", files=upload(files["small"]), data=EHR_FIELDS)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["text"] == EHR  # the cohort builders' sentence
    assert list(answer["probabilities"]) == ["NC", "MCI", "AD"]
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["prediction"] == max(answer["probabilities"], key=answer["probabilities"].get)
    assert set(answer["timings"]) == {"read", "queue", "model", "relevance", "total"}
    assert answer["timings"]["total"] >= answer["timings"]["read"] + answer["timings"]["model"]

    scan = client.get(f"/api/scan/{answer['id']}")
    assert scan.status_code == 200 and scan.content == files["small"].read_bytes()
    report = client.get(f"/api/report/{answer['id']}")
    assert report.status_code == 200 and report.content.startswith(b"\x89PNG")
    relevance = client.get(f"/api/relevance/{answer['relevance_id']}")
    assert relevance.status_code == 200 and answer["relevance_method"] == "gradient"
    image = nib.Nifti1Image.from_bytes(gzip.decompress(relevance.content))
    scan = nib.load(files["small"])
    assert image.shape == scan.shape and np.allclose(image.affine, scan.affine)  # on the scan's own grid
    assert 1 <= len(answer["top_regions"]) <= 10 and all(0 < share <= 1 for _, share in answer["top_regions"])
    peak = np.unravel_index(np.argmax(image.get_fdata()), image.shape)  # where the viewer's crosshair starts
    assert answer["relevance_peak_mm"] == pytest.approx(list((image.affine @ [*peak, 1])[:3]), abs=0.01)
    assert client.get("/docs").status_code == 200 and "/api/predict" in client.get("/openapi.json").json()["paths"]


def test_the_relevance_method_is_chosen_by_name_or_switched_off(client, files):
    attention = client.post("/api/predict", files=upload(files["small"]), data={"method": "attention"}).json()
    assert attention["relevance_method"] == "attention" and attention["top_regions"]
    off = client.post("/api/predict", files=upload(files["small"]), data={"relevance": "false"}).json()
    assert off["relevance_id"] is None and off["top_regions"] == [] and off["timings"]["relevance"] == 0
    assert client.get(f"/api/relevance/{off['id']}").status_code == 404
    assert off["probabilities"] == attention["probabilities"]
    response = client.post("/api/predict", files=upload(files["small"]), data={"method": "saliency"})
    assert response.status_code == 422 and "unknown relevance method 'saliency'" in response.json()["detail"]


def test_free_text_is_read_instead_of_the_fields_and_a_dicom_zip_is_one_scan(client, files):
    answer = client.post("/api/predict", files=upload(files["zip"]), data={"text": "A 70-year-old male.", "age": "80"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["text"] == "A 70-year-old male."
    viewer = client.get(f"/api/scan/{answer.json()['id']}")  # the series as NIfTI for the viewer
    image = nib.Nifti1Image.from_bytes(gzip.decompress(viewer.content))
    assert image.shape == nib.load(ICBM_T1).get_fdata()[::6, ::6, ::6].shape


@pytest.mark.parametrize("name, status, words", [
    ("garbage", 422, ["garbage.nii.gz", "could not read", "not a gzip file"]),
    ("slice", 422, ["slice.nii.gz", "expected a 3D volume", "2D"]),
    ("five_d", 422, ["five_d.npy", "expected a 3D volume", "5D"]),
])
def test_bad_uploads_are_4xx_naming_the_problem(client, files, name, status, words):
    response = client.post("/api/predict", files=upload(files[name]), data=EHR_FIELDS)
    assert response.status_code == status
    message = response.json()["detail"]
    assert all(word in message for word in words), message
    assert "/tmp" not in message  # the upload's name, not the server's temporary path


def test_wrong_type_size_and_fields_are_4xx_and_the_server_keeps_serving(client, service, files):
    response = client.post("/api/predict", files=upload(files["small"], "notes.txt"))
    assert response.status_code == 415 and "notes.txt: unsupported file type" in response.json()["detail"]
    response = client.post("/api/predict", files=upload(files["small"]), data={"mmse": "31"})
    assert response.status_code == 422 and "mmse" in response.json()["detail"]
    response = client.post("/api/predict", files=upload(files["small"]), data={"sex": "X"})
    assert response.status_code == 422 and "sex" in response.json()["detail"]
    limit = service.max_upload_bytes
    service.max_upload_bytes = files["small"].stat().st_size // 2
    try:
        response = client.post("/api/predict", files=upload(files["small"]))
    finally:
        service.max_upload_bytes = limit
    assert response.status_code == 413 and "upload limit" in response.json()["detail"]
    assert client.post("/api/predict", files=upload(files["small"])).status_code == 200
    assert client.get("/api/report/nosuchid").status_code == 404


def test_the_api_gives_the_predict_clis_probabilities(client, checkpoint, files, tmp_path):
    results = tmp_path / "results.csv"
    assert predict_main(["--model-type", "tiny", "--checkpoint", str(checkpoint), "--image", str(files["small"]),
                         "--text", EHR, "--output", str(results)]) == 0
    with results.open(newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    answer = client.post("/api/predict", files=upload(files["small"]), data=EHR_FIELDS).json()
    assert answer["prediction"] == row["prediction"]
    for code, probability in answer["probabilities"].items():
        assert probability == pytest.approx(float(row[f"p_{code}"]), abs=1e-6)  # the CSV has 6 decimals


def test_two_concurrent_clients_of_a_live_server_each_get_their_own_answer(server, files):
    cases = [(files["small"], {"text": "A 90-year-old male. MMSE 12, CDR 2."}), (files["small"], {"text": ""})]
    with httpx.Client(base_url=server, timeout=60) as alone:
        expected = [alone.post("/api/predict", files=upload(path), data=data).json() for path, data in cases]
        before = alone.get("/api/status").json()["queue_jobs"]
    assert expected[0]["probabilities"] != expected[1]["probabilities"]

    answers: list = [None, None]
    start = threading.Barrier(2)

    def ask(index: int) -> None:
        path, data = cases[index]
        with httpx.Client(base_url=server, timeout=60) as client:
            start.wait()
            answers[index] = client.post("/api/predict", files=upload(path), data=data)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for response, alone in zip(answers, expected):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["text"] == alone["text"]
        assert answer["probabilities"] == pytest.approx(alone["probabilities"], abs=1e-6)
    assert answers[0].json()["id"] != answers[1].json()["id"]
    status = httpx.get(f"{server}/api/status").json()
    # each request: read, model pass, relevance map, all on the one queue, never two at once
    assert status["max_concurrent_queue_jobs"] == 1 and status["queue_jobs"] == before + 6


def test_demo_cohort_examples_are_one_request_away(service, files, tmp_path):
    cohort = tmp_path / "cohort"
    (cohort / "images").mkdir(parents=True)
    shutil.copy(files["small"], cohort / "images" / "site-0001.nii.gz")
    record = {"image": "images/site-0001.nii.gz", "subject_id": "site-0001", "label": "AD", "site": "siteD",
              "text": EHR, "ehr": {"age": 75, "sex": "F", "education_years": 12, "mmse": 24, "cdr_global": 0.5}}
    (cohort / "test.jsonl").write_text(json.dumps(record) + "\n")
    with_cohort = Service(service.predictor, service.info, cohort=cohort)
    try:
        client = TestClient(create_app(with_cohort))
        (example,) = client.get("/api/examples").json()
        assert example["id"] == "site-0001" and example["ehr"]["mmse"] == 24 and "image" not in example
        answer = client.post("/api/examples/site-0001/predict?relevance=false").json()
        assert answer["example"] == "site-0001" and answer["text"] == EHR and answer["filename"] == "site-0001.nii.gz"
        response = client.post("/api/examples/nobody/predict")
        assert response.status_code == 404 and "nobody" in response.json()["detail"]
    finally:
        with_cohort.close()


def test_without_the_demo_checkpoint_the_app_serves_the_hint(tmp_path):
    assert find_demo_checkpoint(tmp_path) is None
    service = load_service(None, demo_root=tmp_path)
    try:
        client = TestClient(create_app(service))
        assert client.get("/").status_code == 200
        status = client.get("/api/status").json()
        assert status["ready"] is False and status["problem"] == MAKE_DEMO_HINT
        response = client.post("/api/predict", files=upload(ICBM_T1))
        assert response.status_code == 503 and "run `make demo` first" in response.json()["detail"]
    finally:
        service.close()


def test_a_device_this_machine_lacks_is_refused_before_the_model_loads(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="device 'cuda': this machine has 0 CUDA device"):
        load_service("tiny", str(checkpoint), device="cuda", demo_root=tmp_path)

@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is missing (scripts/bootstrap.sh or .ci/run "
                                                   "installs it)")
def test_the_page_in_chromium(server, files, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(server)
            page.wait_for_function("document.body.dataset.state === 'ready'", timeout=20000)

            def diagnose(path: Path, state: str) -> None:
                page.set_input_files("#file", str(path))
                page.click("#submit")
                page.wait_for_function(f"document.body.dataset.state === '{state}'", timeout=30000)

            page.fill("#age", EHR_FIELDS["age"])
            page.select_option("#sex", EHR_FIELDS["sex"])
            page.fill("#education", EHR_FIELDS["education"])
            page.fill("#mmse", EHR_FIELDS["mmse"])
            page.select_option("#cdr", EHR_FIELDS["cdr"])
            diagnose(files["small"], "done")
            probabilities = [float(p) for p in page.eval_on_selector_all("#probabilities .prob", "bars => bars.map(b => b.dataset.p)")]
            assert len(probabilities) == 3 and sum(probabilities) == pytest.approx(1.0, abs=1e-5)
            assert page.inner_text("#ehrtext") == EHR
            assert page.get_attribute("#download-report", "href").startswith("api/report/")
            assert page.evaluate("document.body.dataset.volumes") == "2"  # the scan and the relevance overlay
            assert page.locator("#regions li").count() >= 1
            assert page.get_attribute("#download-relevance", "href").startswith("api/relevance/")
            canvas = canvas_pixels(page, tmp_path / "canvas.png")
            assert canvas.std() > 10, "the NiiVue canvas is blank"  # a brain in three views, not one colour
            red, green, blue = np.moveaxis(canvas[: int(0.85 * len(canvas))], -1, 0)  # above the colour bars
            warm = (red > 120) & (green - blue > 50)  # the warm colormap; not the grey scan nor the red crosshair
            assert warm.mean() > 0.01, "no relevance overlay on the canvas"

            diagnose(files["garbage"], "error")
            message = page.inner_text("#error")
            assert page.is_visible("#error") and "garbage.nii.gz" in message and "could not read" in message

            diagnose(files["zip"], "done")  # a DICOM series, shown as the NIfTI the readers make of it
            assert not page.is_visible("#error")
            assert page.inner_text("#scanname") == "series.zip"
            page.screenshot(path=tmp_path / "page.png", full_page=True)
            assert (tmp_path / "page.png").stat().st_size > 10_000
            assert problems == [], problems

            page.goto(f"{server}/docs")  # the OpenAPI docs, rendered by the vendored Swagger UI (no CDN here)
            page.wait_for_selector(".opblock-summary-path[data-path=\"/api/predict\"]", timeout=20000)
        finally:
            browser.close()


def canvas_pixels(page, path: Path) -> np.ndarray:
    """The viewer canvas as the browser shows it (a screenshot): (H, W, 3) RGB, 0..255."""
    import matplotlib.image

    page.locator("#gl").screenshot(path=path)
    return 255 * matplotlib.image.imread(path)[..., :3]
