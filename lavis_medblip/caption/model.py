"""``medblip_caption``: LAVIS's BLIP captioning model (``BlipCaption``) for 2D medical images, with
the fine-tuning regimes of MedBLIP (Banerjee & Limbu, arXiv 2505.14726) on ROCO.

``finetune_mode`` decides what trains (the rest has ``requires_grad = False`` and stays in eval mode):

- ``full``: everything.
- ``decoder_only``: the vision encoder (``visual_encoder``) is frozen; the whole text decoder
  trains, cross-attention included.
- ``encoder_only``: the whole text decoder (``text_decoder``: embeddings, self- *and* cross-attention,
  LM head) is frozen, as in the paper; only the ViT trains. The gradient still reaches the ViT
  through the frozen cross-attention, so the image features adapt to a fixed language model.

Everything else is LAVIS's: forward (LM loss on ``text_input`` after the prompt), beam/nucleus
``generate``, the decoder (``XBertLMHeadDecoder``) and ViT (``VisionTransformerEncoder``). What
differs is construction, so that nothing is downloaded:

- the BERT tokenizer comes from the vendored ``bert-base-uncased`` vocabulary;
- the decoder's ``BertConfig`` is LAVIS's ``med_config.json`` updated by ``text_decoder`` in the
  model YAML (the ``tiny`` config shrinks it); its ``encoder_width`` follows the ViT;
- the ViT is LAVIS's ``base``/``large``, or explicit sizes under ``vit`` (``tiny``);
- random-init parts come from ``init_seed`` so that a checkpoint of trainable parameters (what
  our runner saves) always fits the same frozen remainder.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import BertTokenizer

from lavis.common.registry import registry
from lavis.common.utils import get_abs_path
from lavis.models.blip_models.blip_caption import BlipCaption
from lavis.models.med import BertConfig, XBertLMHeadDecoder
from lavis.models.vit import VisionTransformerEncoder, interpolate_pos_embed

from lavis_medblip.assets import BERT_UNCASED_VOCAB_DIR
from lavis_medblip.models.config import CONFIG_DIR
from lavis_medblip.models.weights import check_fits, read_checkpoint, read_state_dict, state_dict_of

logger = logging.getLogger(__name__)
FINETUNE_MODES = ("full", "decoder_only", "encoder_only")
# which top-level module each mode freezes
FROZEN_MODULES = {"full": (), "decoder_only": ("visual_encoder",), "encoder_only": ("text_decoder",)}


class MedBLIPTextDecoder(XBertLMHeadDecoder):
    """LAVIS's decoder, with beam search that works on current ``transformers``.

    LAVIS repeats the image embeddings once per beam before ``generate``; ``transformers`` ≥ 4.27
    expands ``encoder_hidden_states`` per beam itself, so LAVIS's beams would see them twice.
    """

    def generate_from_encoder(self, tokenized_prompt: Any, visual_embeds: torch.Tensor, sep_token_id: int,
                              pad_token_id: int, use_nucleus_sampling: bool = False, num_beams: int = 3,
                              max_length: int = 30, min_length: int = 10, top_p: float = 0.9,
                              repetition_penalty: float = 1.0, **kwargs: Any) -> torch.Tensor:
        image_atts = torch.ones(visual_embeds.size()[:-1], dtype=torch.long, device=visual_embeds.device)
        search = (dict(do_sample=True, top_p=top_p, num_beams=1, repetition_penalty=1.1) if use_nucleus_sampling
                  else dict(do_sample=False, num_beams=num_beams, repetition_penalty=repetition_penalty))
        return self.generate(input_ids=tokenized_prompt.input_ids, max_length=max_length, min_length=min_length,
                             eos_token_id=sep_token_id, pad_token_id=pad_token_id, encoder_hidden_states=visual_embeds,
                             encoder_attention_mask=image_atts, **search)


@registry.register_model("medblip_caption")
class MedBLIPCaption(BlipCaption):
    """BLIP captioning (ViT → BERT decoder with cross-attention) with a ``finetune_mode``.

    Model types: ``base`` (ViT-B/16 at 384 px, BERT-base decoder, LAVIS's BLIP COCO caption weights)
    and ``tiny`` (random init, for tests and demos on CPU).
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        name: str(CONFIG_DIR / f"caption_{name}.yaml")  # absolute: LAVIS joins it to its own dir
        for name in ("base", "tiny")
    }

    def __init__(self, image_encoder: torch.nn.Module, text_decoder: torch.nn.Module, prompt: str = "a picture of ",
                 max_txt_len: int = 40, finetune_mode: str = "full"):
        if finetune_mode not in FINETUNE_MODES:
            raise ValueError(f"finetune_mode must be one of {FINETUNE_MODES}, got {finetune_mode!r}")
        super().__init__(image_encoder, text_decoder, prompt=prompt, max_txt_len=max_txt_len)
        self.finetune_mode = finetune_mode
        self.apply_finetune_mode()

    @classmethod
    def init_tokenizer(cls) -> BertTokenizer:
        """LAVIS's BLIP tokenizer ([DEC] as BOS, an extra [ENC]) from the vendored vocabulary."""
        tokenizer = BertTokenizer.from_pretrained(str(BERT_UNCASED_VOCAB_DIR))
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
        return tokenizer

    # ---- fine-tuning regimes ---------------------------------------------------------------------
    @property
    def frozen_modules(self) -> tuple[str, ...]:
        return FROZEN_MODULES[self.finetune_mode]

    def apply_finetune_mode(self) -> None:
        for name, parameter in self.named_parameters():
            parameter.requires_grad = name.split(".")[0] not in self.frozen_modules
        for name in self.frozen_modules:
            getattr(self, name).eval()

    def train(self, mode: bool = True) -> "MedBLIPCaption":
        super().train(mode)
        for name in self.frozen_modules:  # frozen parts keep dropout off, like LAVIS's frozen ViTs
            getattr(self, name).eval()
        return self

    def forward_encoder(self, samples: dict[str, Any]) -> torch.Tensor:
        if "visual_encoder" in self.frozen_modules:
            with torch.no_grad():  # no activations kept for a backward pass that never comes
                return self.visual_encoder.forward_features(samples["image"])
        return self.visual_encoder.forward_features(samples["image"])

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def build_vision_encoder(cls, cfg: dict) -> VisionTransformerEncoder:
        """LAVIS's ViT-B/L (``vit_type``), or explicit sizes under ``vit`` (patch_size, width, depth, heads)."""
        sizes = cfg.get("vit")
        if not sizes:
            return VisionTransformerEncoder.from_config(OmegaConf.create(cfg))
        encoder = VisionTransformerEncoder(
            img_size=cfg.get("image_size", 224), patch_size=sizes.get("patch_size", 16), embed_dim=sizes["width"],
            depth=sizes["depth"], num_heads=sizes["heads"], mlp_ratio=sizes.get("mlp_ratio", 4.0),
            drop_path_rate=cfg.get("vit_drop_path_rate", 0.0))
        encoder.vision_width = sizes["width"]
        return encoder

    @classmethod
    def build_text_decoder(cls, cfg: dict, encoder_width: int, vocab_size: int) -> MedBLIPTextDecoder:
        med_config = BertConfig.from_json_file(get_abs_path(cfg.get("med_config_path", "configs/models/med_config.json")))
        med_config.update(dict(cfg.get("text_decoder") or {}))
        med_config.encoder_width = encoder_width  # the decoder's cross-attention reads the ViT's tokens
        if med_config.vocab_size != vocab_size:
            raise ValueError(f"text decoder vocab_size {med_config.vocab_size} != tokenizer size {vocab_size}")
        return MedBLIPTextDecoder(config=med_config)

    @classmethod
    def from_config(cls, cfg: Any) -> "MedBLIPCaption":
        cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        vocab_size = len(cls.init_tokenizer())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.get("init_seed", 0))
            image_encoder = cls.build_vision_encoder(cfg)
            text_decoder = cls.build_text_decoder(cfg, image_encoder.vision_width, vocab_size)
        model = cls(image_encoder, text_decoder, prompt=cfg.get("prompt", "a picture of "),
                    max_txt_len=cfg.get("max_txt_len", 40), finetune_mode=cfg.get("finetune_mode", "full"))
        if cfg.get("pretrained"):
            model.load_from_pretrained(cfg["pretrained"])
        if cfg.get("load_finetuned") and cfg.get("finetuned"):
            model.load_checkpoint(cfg["finetuned"])
        logger.info("medblip_caption (%s): %d trainable / %d parameters", model.finetune_mode,
                    model.num_trainable_parameters(), sum(p.numel() for p in model.parameters()))
        return model

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ---- weights ---------------------------------------------------------------------------------
    def load_from_pretrained(self, url_or_filename: str) -> None:
        """A BLIP checkpoint (e.g. LAVIS's ``blip_coco_caption_base.pth``); the ViT's position
        embedding is interpolated to ``image_size`` and shape-mismatched tensors are skipped."""
        state_dict = dict(read_state_dict(url_or_filename, key="pretrained"))
        own = self.state_dict()
        if "visual_encoder.pos_embed" in state_dict:
            state_dict["visual_encoder.pos_embed"] = interpolate_pos_embed(state_dict["visual_encoder.pos_embed"],
                                                                           self.visual_encoder)
        mismatched = [key for key in state_dict if key in own and state_dict[key].shape != own[key].shape]
        for key in mismatched:
            del state_dict[key]
        result = self.load_state_dict(state_dict, strict=False)
        logger.info("loaded %s: %d missing, %d unexpected, %d shape-mismatched keys", url_or_filename,
                    len(result.missing_keys), len(result.unexpected_keys), len(mismatched))

    def load_checkpoint(self, url_or_filename: str) -> None:
        """A checkpoint of trainable parameters (our runner's) or a full state dict; unknown keys are errors."""
        checkpoint = read_checkpoint(url_or_filename, key="finetuned")
        check_fits(url_or_filename, checkpoint, self.state_dict(), this_model="medblip_caption")
        state_dict = state_dict_of(checkpoint, url_or_filename)
        self.load_state_dict(state_dict, strict=False)
        logger.info("loaded %d tensors from %s", len(state_dict), url_or_filename)
