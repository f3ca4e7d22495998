"""Turn a training checkpoint into a self-contained model bundle (:mod:`lavis_medblip.models.bundle`)::

    python -m lavis_medblip.export --model-type demo --checkpoint run/checkpoint_calibrated.pth --out bundles/demo \\
        --metrics metrics.json --training-data "simulated cohort, 375 subjects (python -m lavis_medblip.demo)"

The checkpoint is read with ``torch.load(weights_only=True)`` (a file that needs pickled code is refused), fitted
to the model it names, and written as ``config.yaml`` + ``model.safetensors`` (+ ``calibration.json``) + ``README.md``.
Without ``--model-type`` the model config the checkpoint records (ours and the runner's record one) is used.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

# LAVIS and torch load where used, after the command line is checked (cli/arguments.py says why).


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lavis_medblip.export",
                                     description="Write a MedBLIP checkpoint (.pth) as a model bundle folder "
                                                 "(config.yaml, model.safetensors, README.md model card).")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of trained parameters (.pth)")
    parser.add_argument("--model-type", help="registered MedBLIP model type it was trained as (default: the model "
                                             "config the checkpoint records)")
    parser.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", action="extend",
                        help="override model config keys, e.g. lm.model=/models/BioMedLM (repeatable); the bundle "
                             "records them")
    parser.add_argument("--out", required=True, type=Path, help="the bundle folder to write (created)")
    parser.add_argument("--metrics", type=Path, help="a JSON object of metrics for the model card")
    parser.add_argument("--training-data", help="what it was trained on, one line for the model card")
    parser.add_argument("--license", default="other", help="the model card's license field (default: %(default)s)")
    return parser


def recorded_model_config(path: str, options: Sequence[str]) -> Any:
    """The model config a checkpoint records (``config``: ours the model's, the runner's the run's), with options.

    The checkpoint is read here and again by ``load_checkpoint``: it holds the trained parameters only.
    """
    from lavis_medblip.models.bundle import merge_options
    from lavis_medblip.models.config import MedBLIPConfig
    from lavis_medblip.models.weights import CheckpointError, read_checkpoint

    checkpoint = read_checkpoint(path)
    config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    config = config.get("model", config) if isinstance(config, Mapping) else None
    if not isinstance(config, Mapping) or "vision" not in config and "arch" not in config:
        raise CheckpointError(path, "records no model config; name the model it was trained as with --model-type")
    if config.get("arch", "medblip") != "medblip":
        raise CheckpointError(path, f"is a {config['arch']} checkpoint; bundles hold medblip models")
    try:
        MedBLIPConfig.from_dict(config)
    except ValueError as error:
        raise CheckpointError(path, f"its recorded model config is not valid here: {error}") from None
    return merge_options(OmegaConf.create({"model": dict(config)}), options).model


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    from lavis_medblip.inference import load_config
    from lavis_medblip.models import MedBLIP
    from lavis_medblip.models.bundle import LOCAL_KEYS, read_metrics
    from lavis_medblip.models.weights import CheckpointError

    try:
        metrics = read_metrics(args.metrics)
        config = load_config(args.model_type, args.options) if args.model_type else None
        model_config = recorded_model_config(args.checkpoint, args.options) if config is None else config.model
        model = MedBLIP.from_config(OmegaConf.merge(model_config, LOCAL_KEYS))  # no earlier stage's checkpoint, cache
        model.load_checkpoint(args.checkpoint)
    except ValueError as error:  # of the options or the metrics file
        parser.error(str(error))
    except CheckpointError as error:
        print(f"error: cannot export the checkpoint {error}", file=sys.stderr)
        return 1
    out = model.save_pretrained(args.out, metrics=metrics, training_data=args.training_data,
                                preprocess=config.preprocess if config is not None else None, license=args.license)
    print(f"wrote the model bundle {out}: {', '.join(sorted(path.name for path in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
