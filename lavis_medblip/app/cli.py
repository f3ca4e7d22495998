"""Try MedBLIP in the browser: ``python -m lavis_medblip.app`` (``medblip-app``, ``make app``).

Serves the page and the REST API on http://127.0.0.1:7860 (docs at /docs). The default model is the demo's
trained image + text model (``make demo``'s calibrated checkpoint); without it the page and this console say
how to make it, and ``--model-type tiny`` serves untrained weights. Other models::

    python -m lavis_medblip.app --model-type biomedlm_lora --checkpoint ckpt.pth --options lm.model=/models/BioMedLM
    python -m lavis_medblip.app --model bundles/demo    # a model bundle folder (save_pretrained, lavis_medblip.export)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from lavis_medblip.cli.arguments import check_checkpoint

DEMO_ROOT = Path(".cache/demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lavis_medblip.app", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--model-type", help="registered MedBLIP model type (default: demo, with the demo's "
                                             "checkpoint when `make demo` has made it)")
    parser.add_argument("--checkpoint", help="trained checkpoint (.pth); default with the demo model: the demo's")
    parser.add_argument("--model", metavar="DIR", help="a model bundle folder (its config, weights and calibration), "
                                                       "instead of --model-type/--checkpoint")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", action="extend",
                        help="override model config keys, as the predict CLI's --options")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    parser.add_argument("--demo-root", type=Path, default=DEMO_ROOT,
                        help="the demo's folder: its checkpoint and its cohort's examples (default: %(default)s)")
    parser.add_argument("--max-upload-mb", type=float, default=None, help="largest upload accepted (default: 512)")
    parser.add_argument("--relevance-method", default="gradient",
                        help="the relevance map's default method, gradient or attention (the page can choose; "
                             "default: %(default)s)")
    parser.add_argument("--no-relevance", action="store_true", help="do not compute relevance maps")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None and (args.model_type is not None or args.checkpoint is not None):
        parser.error("--model is a bundle folder with its own config and weights: not with --model-type/--checkpoint")
    check_checkpoint(parser, args.checkpoint)

    import uvicorn

    from lavis_medblip.app.server import create_app
    from lavis_medblip.app.service import load_service

    try:
        service = load_service(args.model_type, args.checkpoint, args.options, args.device, demo_root=args.demo_root,
                               bundle=args.model,
                               max_upload_mb=args.max_upload_mb, relevance=not args.no_relevance,
                               relevance_method=args.relevance_method)
    except ValueError as error:
        parser.error(str(error))
    if service.predictor is None:
        print(f"warning: {service.info.problem}", file=sys.stderr)
    else:
        print(f"model: {service.info.model_type}, checkpoint {service.info.checkpoint or 'none (untrained)'}",
              file=sys.stderr)
    print(f"MedBLIP app on http://{args.host}:{args.port}/ (API docs: /docs); Ctrl-C stops it", file=sys.stderr)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
