"""Command-line pieces the commands share, checked before LAVIS and torch load (loading them takes seconds;
``--help`` and a wrong path should answer at once: ``tests/test_light_imports.py``)."""
from __future__ import annotations

import argparse
import os
from typing import Sequence
from urllib.parse import urlparse

import yaml
from omegaconf import OmegaConf


def config_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The command line of LAVIS's scripts: ``--cfg-path`` and ``--options``."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--cfg-path", required=True, help="path to a project YAML, e.g. projects/medblip/demo_pretrain.yaml")
    parser.add_argument("--options", nargs="+", help="override settings as key=value, e.g. run.max_epoch=2")
    return parser


def parse_config_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a ``--cfg-path`` that is not a file, or not YAML, is a usage error."""
    args = parser.parse_args(argv)
    if not os.path.isfile(args.cfg_path):
        parser.error(f"--cfg-path {args.cfg_path}: no such file")
    try:
        OmegaConf.load(args.cfg_path)  # as LAVIS's Config reads it
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        parser.error(f"--cfg-path {args.cfg_path}: not a YAML file: {error}")
    return args


def check_checkpoint(parser: argparse.ArgumentParser, checkpoint: str | None) -> None:
    """A ``--checkpoint`` (a ``.pth`` or a bundle folder) on this machine must exist; a URL is downloaded later."""
    if checkpoint is not None and urlparse(checkpoint).scheme not in ("http", "https") and not os.path.exists(checkpoint):
        parser.error(f"--checkpoint {checkpoint}: no such file or folder")
