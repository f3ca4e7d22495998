"""Upload-to-answer time of the web app, split into reading/preprocessing, model and relevance map.

Starts the app (``lavis_medblip.app``) on a live uvicorn server at a free port of 127.0.0.1, with the demo model
(``make demo``'s checkpoint) by default, posts each scan ``--repeats`` times (after one untimed warm-up) with an
HTTP client and prints the median of the server's timings (``read``: upload saved, scan read and preprocessed;
``model``: the diagnosis pass; ``relevance``: the relevance map, which reads the scan again (for its geometry) and maps
the map back onto the scan's grid) and of the client's wall time from upload to answer::

    python benchmarks/app_latency.py [--repeats 5] [--model-type demo --checkpoint ckpt.pth] [--no-relevance]

The default scans: the first scan of the demo cohort's held-out site (``.cache/demo/cohort``) and the 1 mm ICBM-2009c T1.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EHR_FIELDS = {"age": "75", "sex": "F", "education": "12", "mmse": "24", "cdr": "0.5"}


def default_scans(demo_root: Path) -> list[Path]:
    """The first scan of the demo cohort's held-out site (when there) and the 1 mm ICBM T1."""
    import json

    from lavis_medblip.assets import ICBM_T1

    held_out = demo_root / "cohort" / "test.jsonl"
    first = json.loads(held_out.read_text().splitlines()[0])["image"] if held_out.is_file() else None
    return [*([demo_root / "cohort" / first] if first else []), ICBM_T1]


def serve(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("uvicorn did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-type", help="default: the demo model with its checkpoint")
    parser.add_argument("--checkpoint")
    parser.add_argument("--options", nargs="+", default=[], action="extend")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--demo-root", type=Path, default=Path(".cache/demo"))
    parser.add_argument("--scans", nargs="+", type=Path, help="default: a held-out demo cohort scan and the 1 mm ICBM T1")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-relevance", action="store_true")
    args = parser.parse_args()

    import httpx

    from lavis_medblip.app.server import create_app
    from lavis_medblip.app.service import load_service

    service = load_service(args.model_type, args.checkpoint, args.options, args.device, demo_root=args.demo_root,
                           relevance=not args.no_relevance)
    if service.predictor is None:
        print(f"error: {service.info.problem}", file=sys.stderr)
        return 1
    url, server, thread = serve(create_app(service))
    scans = args.scans or default_scans(args.demo_root)
    print(f"model {service.info.model_type} ({service.info.checkpoint or 'untrained'}), device {args.device}, "
          f"relevance {'on' if service.relevance else 'off'}, {args.repeats} uploads per scan after a warm-up, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'scan':<34}{'MB':>6}{'read':>9}{'model':>9}{'relevance':>11}{'server':>9}{'client':>9}   (median s)")
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            for scan in scans:
                payload = scan.read_bytes()

                def post() -> tuple[dict, float]:
                    start = time.perf_counter()
                    response = client.post("/api/predict", files={"file": (scan.name, payload)}, data=EHR_FIELDS)
                    elapsed = time.perf_counter() - start
                    if response.status_code != 200:
                        raise SystemExit(f"{scan}: HTTP {response.status_code}: {response.text}")
                    return response.json()["timings"], elapsed

                post()  # warm-up: first-call costs (allocations, the atlas resampled for the map's grid)
                runs = [post() for _ in range(args.repeats)]
                median = {key: statistics.median(timings[key] for timings, _ in runs)
                          for key in ("read", "model", "relevance", "total")}
                client_median = statistics.median(elapsed for _, elapsed in runs)
                print(f"{scan.name:<34}{len(payload) / 2**20:>6.1f}{median['read']:>9.2f}{median['model']:>9.2f}"
                      f"{median['relevance']:>11.2f}{median['total']:>9.2f}{client_median:>9.2f}")
    finally:
        server.should_exit = True
        thread.join(10)
        service.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
