"""Exact parameter counts of the six paper variants (built on the meta device) and a GPU memory estimate.
The memory model: README, Design notes.

    python benchmarks/memory_estimate.py [--batch-size 8] [--text-tokens 96] [--gpu-gib 24]
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import lavis_medblip  # noqa: E402,F401
from lavis_medblip.models import MedBLIP  # noqa: E402

# The hub LMs cannot be downloaded here: from each model's published config.json on the Hugging Face hub.
# (The ViT-g and the BERT-base Q-Former are LAVIS's own.) Nothing is allocated: parameters live on the meta device.
LM_ARCHITECTURES = {
    "stanford-crfm/BioMedLM": dict(model_type="gpt2", n_embd=2560, n_layer=32, n_head=20, n_positions=1024,
                                   vocab_size=28896),
    "microsoft/BioGPT-Large": dict(model_type="biogpt", hidden_size=1600, num_hidden_layers=48,
                                   num_attention_heads=25, intermediate_size=6400, max_position_embeddings=2048,
                                   vocab_size=57717),
    "google/flan-t5-xl": dict(model_type="t5", d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24,
                              num_decoder_layers=24, vocab_size=32128, feed_forward_proj="gated-gelu",
                              tie_word_embeddings=False),
}
PAPER_TRAINABLE = {"biomedlm": "151M", "biomedlm_lora": "154M", "biogpt": "151M", "biogpt_lora": "156M",
                   "flant5xl": "151M", "flant5xl_lora": "156M"}
GIB = 1024**3


def build_on_meta(model_type: str) -> MedBLIP:
    config = OmegaConf.load(MedBLIP.default_config_path(model_type)).model
    config.vision.weights = None
    config.qformer_pretrained = None
    config.qformer.load_bert_weights = False  # BertConfig() is bert-base-uncased; the vocab is vendored
    config.qformer.bert = "${medblip_asset:bert-base-uncased}"
    config.lm.config_overrides = LM_ARCHITECTURES[config.lm.model]
    config.lm.tokenizer = "${medblip_asset:bert-base-uncased}"
    config.lm.tokenizer_kwargs = {"eos_token": "[SEP]"}
    with init_empty_weights():
        return MedBLIP.from_config(config)


def layer_activation_bytes(tokens: int, batch: int, hidden: int, heads: int, checkpointing: bool) -> float:
    """Korthikanti et al. (2022) for an fp16 layer, ``s·b·h·(34 + 5·a·s/h)``; checkpointed, its input, ``2·s·b·h``."""
    if checkpointing:
        return 2.0 * tokens * batch * hidden
    return tokens * batch * hidden * (34 + 5 * heads * tokens / hidden)


def estimate(model: MedBLIP, batch: int, text_tokens: int, checkpointing: bool) -> dict[str, float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    vit = model.visual_encoder
    vit_tokens = vit.patch_embed.num_patches + 1
    vit_heads = vit.blocks[0].attn.num_heads
    lm_config = model.language_model.model.config
    lm_hidden = model.language_model.hidden_size
    lm_heads = getattr(lm_config, "n_head", None) or getattr(lm_config, "num_attention_heads", None) or lm_config.num_heads
    lm_layers = getattr(lm_config, "n_layer", None) or getattr(lm_config, "num_hidden_layers", None) or 2 * lm_config.num_layers
    lm_tokens = model.query_tokens.shape[1] + text_tokens
    qformer = model.Qformer.config
    activations = (
        len(vit.blocks) * layer_activation_bytes(vit_tokens, batch, vit.embed_dim, vit_heads, checkpointing)
        + lm_layers * layer_activation_bytes(lm_tokens, batch, lm_hidden, lm_heads, False)
        # the Q-Former runs twice more for the two ITC text branches; never checkpointed
        + 3 * qformer.num_hidden_layers * layer_activation_bytes(max(model.query_tokens.shape[1], text_tokens), batch,
                                                                  qformer.hidden_size, qformer.num_attention_heads, False)
    )
    if checkpointing:  # one layer's full activations are rebuilt at a time
        activations += layer_activation_bytes(vit_tokens, batch, vit.embed_dim, vit_heads, False)
    return {"trainable": trainable, "frozen": frozen, "weights_gib": (2 * frozen + 16 * trainable) / GIB,
            "activations_gib": activations / GIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--text-tokens", type=int, default=96, help="EHR text + question + answer tokens")
    parser.add_argument("--gpu-gib", type=float, default=24.0, help="an RTX 3090 has 24 GB")
    args = parser.parse_args()
    print(f"batch size {args.batch_size}, {args.text_tokens} text tokens, GPU {args.gpu_gib:.0f} GiB")
    header = (f"{'model_type':<15}{'trainable':>11}{'paper':>7}{'total':>9}{'weights+optim':>15}"
              f"{'activations':>13}{'total GiB':>11}{'fits':>6}{'ckpt act.':>11}{'ckpt total':>12}{'fits':>6}")
    print(header)
    print("-" * len(header))
    for model_type in PAPER_TRAINABLE:
        model = build_on_meta(model_type)
        plain = estimate(model, args.batch_size, args.text_tokens, checkpointing=False)
        ckpt = estimate(model, args.batch_size, args.text_tokens, checkpointing=True)
        total_plain = plain["weights_gib"] + plain["activations_gib"]
        total_ckpt = ckpt["weights_gib"] + ckpt["activations_gib"]
        print(f"{model_type:<15}{plain['trainable'] / 1e6:>10.1f}M{PAPER_TRAINABLE[model_type]:>7}"
              f"{(plain['trainable'] + plain['frozen']) / 1e9:>8.2f}B{plain['weights_gib']:>15.1f}"
              f"{plain['activations_gib']:>13.1f}{total_plain:>11.1f}{'yes' if total_plain < args.gpu_gib else 'no':>6}"
              f"{ckpt['activations_gib']:>11.1f}{total_ckpt:>12.1f}{'yes' if total_ckpt < args.gpu_gib else 'no':>6}")
        del model
    print("\ntrainable parameters of biomedlm_lora by part:")
    model = build_on_meta("biomedlm_lora")
    parts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            part = "Q-Former word/position embeddings" if "Qformer.bert.embeddings" in name else (
                "LoRA" if "lora_" in name else name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("visual_encoder") else ""))
            parts[part] = parts.get(part, 0) + parameter.numel()
    for part, count in sorted(parts.items(), key=lambda item: -item[1]):
        print(f"  {part:<36}{count / 1e6:>8.2f}M")
    print("\nckpt: gradient checkpointing of the ViT blocks (model.vision.grad_checkpoint: true); LM layers are never"
          " checkpointed here.")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
