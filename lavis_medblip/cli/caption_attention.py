"""Where the caption decoder looks: per-word cross-attention maps of ``medblip_caption``.

``python -m lavis_medblip.caption_attention --model-type tiny --checkpoint ckpt.pth --image img.png --out attn.png``

For each image: generate a caption, run the decoder once more over prompt + caption with the
last layer's cross-attention recorded, and draw a PNG with the image followed by one panel per
word (its attention over the ViT's patch grid, averaged over heads, upsampled and overlaid), the
caption underneath. A word's map is the attention of the decoder step that *produced* it (the
query one position earlier); a word split into word-pieces gets the mean of its pieces' maps.
Next to each PNG, ``<name>.json`` holds the caption and the words in panel order.

Several ``--image`` s need ``--out`` to be a folder: ``<folder>/<image stem>_attention.png``.
The figure is ``columns × panel_px`` wide and ``rows × panel_px + caption_px`` high, with
``columns = min(1 + words, max_columns)``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from omegaconf import OmegaConf
from PIL import Image

from lavis.common.registry import registry

import lavis_medblip  # noqa: F401  (registers medblip_caption)
from lavis_medblip.caption.datasets import read_rgb  # noqa: E402
from lavis_medblip.caption.model import MedBLIPCaption  # noqa: E402

CAPTION_PX = 40
DPI = 100


@dataclass
class WordAttention:
    caption: str
    words: list[str]
    maps: np.ndarray  # words × grid × grid, each summing to ≤ 1 over the patches


def load_caption_model(model_type: str = "tiny", checkpoint: str | None = None) -> tuple[MedBLIPCaption, object, int]:
    """The model (eval mode), its eval image processor, and its input size."""
    config = OmegaConf.load(MedBLIPCaption.default_config_path(model_type))
    if checkpoint:
        config.model.load_finetuned, config.model.finetuned = True, str(checkpoint)
    model = MedBLIPCaption.from_config(config.model).eval()
    processor_cfg = config.preprocess.vis_processor.eval
    processor = registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)
    return model, processor, int(config.model.image_size)


@torch.no_grad()
def word_cross_attention(model: MedBLIPCaption, image: torch.Tensor, max_len: int = 20, num_beams: int = 1) -> WordAttention:
    """Caption one preprocessed image (3 × H × W) and each word's last-layer cross-attention map."""
    image = image.unsqueeze(0).to(model.device)
    caption = model.generate({"image": image}, num_beams=num_beams, max_length=max_len, min_length=1)[0].strip()
    image_embeds = model.forward_encoder({"image": image})
    tokens = model.tokenizer(model.prompt + caption, return_tensors="pt").to(model.device)
    tokens.input_ids[:, 0] = model.tokenizer.bos_token_id
    cross_attention = model.text_decoder.bert.encoder.layer[-1].crossattention.self
    cross_attention.save_attention = True
    try:
        # LAVIS records the map only alongside a gradient hook, so this one pass tracks gradients
        with torch.enable_grad():
            model.text_decoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                               encoder_hidden_states=image_embeds.detach().requires_grad_(True),
                               encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long,
                                                                 device=model.device),
                               return_dict=True)
        attention = cross_attention.get_attention_map()[0].detach().mean(0)  # tokens × (1 + patches), heads averaged
    finally:
        cross_attention.save_attention = False
    grid = int(math.isqrt(attention.shape[-1] - 1))
    patch_maps = attention[:, 1:].reshape(-1, grid, grid)  # the ViT's [CLS] token has no place on the image

    # caption tokens sit after [DEC] + prompt and before [SEP]; the step producing token t is t − 1
    pieces = model.tokenizer.convert_ids_to_tokens(tokens.input_ids[0].tolist())
    first = model.prompt_length
    words: list[str] = []
    maps: list[list[torch.Tensor]] = []
    for position in range(first, len(pieces) - 1):
        piece = pieces[position]
        if piece.startswith("##") and words:
            words[-1] += piece[2:]
            maps[-1].append(patch_maps[position - 1])
        else:
            words.append(piece)
            maps.append([patch_maps[position - 1]])
    stacked = np.stack([torch.stack(group).mean(0).cpu().numpy() for group in maps]) if maps else np.zeros((0, grid, grid))
    return WordAttention(caption=caption, words=words, maps=stacked)


def figure_layout(num_words: int, max_columns: int = 6) -> tuple[int, int]:
    """(columns, rows) of panels: the image, then one per word."""
    panels = 1 + num_words
    columns = min(panels, max_columns)
    return columns, math.ceil(panels / columns)


def draw_attention_figure(picture: Image.Image, result: WordAttention, out: str | os.PathLike, image_size: int,
                          panel_px: int = 160, max_columns: int = 6) -> Path:
    """Write the PNG (exactly ``columns·panel_px × rows·panel_px + 40`` pixels) and its JSON sidecar."""
    picture = np.asarray(picture.resize((image_size, image_size), Image.BICUBIC).convert("L"))
    columns, rows = figure_layout(len(result.words), max_columns)
    figure = Figure(figsize=(columns * panel_px / DPI, (rows * panel_px + CAPTION_PX) / DPI), dpi=DPI)
    strip = CAPTION_PX / (rows * panel_px + CAPTION_PX)
    height = (1 - strip) / rows
    titles = ["image", *result.words]
    overlays = [None, *result.maps]
    for index, (title, attention) in enumerate(zip(titles, overlays)):
        row, column = divmod(index, columns)
        axes = figure.add_axes((column / columns, 1 - (row + 1) * height, 1 / columns, height))
        axes.imshow(picture, cmap="gray", extent=(0, image_size, image_size, 0))
        if attention is not None:
            upsampled = F.interpolate(torch.from_numpy(attention)[None, None].float(), size=(image_size, image_size),
                                      mode="bilinear", align_corners=False)[0, 0].numpy()
            axes.imshow(upsampled, cmap="jet", alpha=0.45, extent=(0, image_size, image_size, 0))
        axes.text(0.03, 0.97, title, transform=axes.transAxes, va="top", fontsize=9, color="white",
                  bbox=dict(facecolor="black", alpha=0.6, pad=1, edgecolor="none"))
        axes.set_axis_off()
    figure.text(0.5, strip / 2, result.caption or "(empty caption)", ha="center", va="center", fontsize=9, wrap=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=DPI)
    out.with_suffix(".json").write_text(json.dumps({"caption": result.caption, "words": result.words}, indent=2))
    return out


def output_paths(images: Sequence[str], out: str) -> list[Path]:
    if len(images) == 1 and out.lower().endswith(".png"):
        return [Path(out)]
    if out.lower().endswith(".png"):
        raise ValueError("several --image need --out to be a folder")
    return [Path(out) / f"{Path(image).stem}_attention.png" for image in images]


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-type", default="tiny", choices=sorted(MedBLIPCaption.PRETRAINED_MODEL_CONFIG_DICT))
    parser.add_argument("--checkpoint", help="a medblip_caption checkpoint (e.g. a run's checkpoint_best.pth)")
    parser.add_argument("--image", nargs="+", required=True)
    parser.add_argument("--out", required=True, help="a .png for one image, else a folder")
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--panel-px", type=int, default=160)
    args = parser.parse_args(argv)

    model, processor, image_size = load_caption_model(args.model_type, args.checkpoint)
    written = []
    for image_path, out in zip(args.image, output_paths(args.image, args.out)):
        picture = read_rgb(image_path)
        result = word_cross_attention(model, processor(picture), max_len=args.max_len, num_beams=args.num_beams)
        written.append(draw_attention_figure(picture, result, out, image_size, panel_px=args.panel_px))
        print(f"{image_path}: {result.caption!r} → {out}")
    return written


if __name__ == "__main__":
    main()
