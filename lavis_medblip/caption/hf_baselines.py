"""Zero-shot captioning baselines of Banerjee & Limbu (2025) that LAVIS 1.0.2 does not register, as LAVIS
models scored by ``medblip_captioning``:

- ``vit_gpt2_caption``: ViT-GPT2, transformers' ``VisionEncoderDecoderModel`` (type ``base``:
  ``nlpconnect/vit-gpt2-image-captioning``);
- ``instructblip_t5_caption``: InstructBLIP with FLAN-T5-XL, transformers' ``InstructBlipForConditionalGeneration``
  (type ``flant5xl``: ``Salesforce/instructblip-flan-t5-xl``, the converted LAVIS weights). LAVIS 1.0.2, the
  version on PyPI, predates InstructBLIP (LAVIS's own ``blip2_t5_instruct`` came later), so it runs through
  transformers; the instruction goes to the Q-Former and to the LM, as in LAVIS's.

BLIP-2 OPT is LAVIS's own ``blip2_opt``, used as it is. Each model here reads ``pretrained`` (a hub name or
a local folder), or builds a random model of the architecture in ``hf_config`` (the ``tiny`` types, for tests:
nothing is downloaded). They only caption: ``forward`` (training) is not offered.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
from omegaconf import OmegaConf
from transformers import (AutoConfig, AutoTokenizer, GPT2LMHeadModel, InstructBlipConfig,
                          InstructBlipForConditionalGeneration, VisionEncoderDecoderConfig, VisionEncoderDecoderModel,
                          ViTModel)
from transformers.modeling_utils import load_state_dict
from transformers.utils import cached_file

from lavis.common.registry import registry
from lavis.models.base_model import BaseModel

from lavis_medblip.models.config import CONFIG_DIR
from lavis_medblip.models.weights import from_pretrained_or_explain

logger = logging.getLogger(__name__)


class HFCaptioner(BaseModel):
    """A transformers captioner behind LAVIS's model interface (``from_config``, ``generate(samples, ...)``)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, prompt: str = ""):
        super().__init__()
        self.model, self.tokenizer, self.prompt = model.eval(), tokenizer, prompt

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "HFCaptioner":
        cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        if cfg.get("hf_config"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.get("init_seed", 0))
                model = cls.random_model(cfg["hf_config"])
        else:
            model = from_pretrained_or_explain(cls.load_pretrained, "pretrained", cfg.get("pretrained"))
        tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, "tokenizer",
                                               cfg.get("tokenizer") or cfg.get("pretrained"))
        built = cls.assemble(model, tokenizer, cfg)
        logger.info("%s: %d parameters", cls.__name__, sum(p.numel() for p in built.parameters()))
        return built

    @classmethod
    def load_pretrained(cls, source: str) -> torch.nn.Module:
        return cls.HF_CLASS.from_pretrained(source)

    @classmethod
    def assemble(cls, model: torch.nn.Module, tokenizer: Any, cfg: Mapping[str, Any]) -> "HFCaptioner":
        return cls(model, tokenizer, prompt=cfg.get("prompt", ""))

    def forward(self, samples: Mapping[str, Any]) -> Any:
        raise NotImplementedError(f"{type(self).__name__} is a zero-shot baseline: evaluate it (run.evaluate: true)")

    @staticmethod
    def search(use_nucleus_sampling: bool, num_beams: int, max_length: int, min_length: int, top_p: float,
               repetition_penalty: float) -> dict[str, Any]:
        """``generate`` keywords from the arguments LAVIS's captioners take."""
        sampling = dict(do_sample=True, top_p=top_p, num_beams=1) if use_nucleus_sampling else dict(num_beams=num_beams)
        return dict(max_length=max_length, min_length=min_length, repetition_penalty=repetition_penalty, **sampling)


@registry.register_model("vit_gpt2_caption")
class ViTGPT2Caption(HFCaptioner):
    """ViT encoder → GPT-2 decoder with cross-attention (``nlpconnect/vit-gpt2-image-captioning``)."""

    PRETRAINED_MODEL_CONFIG_DICT = {name: str(CONFIG_DIR / f"caption_vit_gpt2_{name}.yaml") for name in ("base", "tiny")}

    @classmethod
    def build(cls, config: VisionEncoderDecoderConfig) -> VisionEncoderDecoderModel:
        """ViT + GPT-2 named explicitly: transformers' AutoModel lookup of a ViT config imports every model's
        config, and its timm wrapper fails with LAVIS's timm 0.4.12."""
        return VisionEncoderDecoderModel(config=config, encoder=ViTModel(config.encoder),
                                         decoder=GPT2LMHeadModel(config.decoder))

    @classmethod
    def random_model(cls, hf_config: Mapping[str, Any]) -> VisionEncoderDecoderModel:
        encoder, decoder = (AutoConfig.for_model(**hf_config[part]) for part in ("encoder", "decoder"))
        config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
        for key in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
            setattr(config, key, hf_config[key])
        return cls.build(config)

    @classmethod
    def load_pretrained(cls, source: str) -> VisionEncoderDecoderModel:
        """``from_pretrained``'s result without its AutoModel lookup (see :meth:`build`); every weight must fit."""
        model = cls.build(VisionEncoderDecoderConfig.from_pretrained(source))
        try:
            weights = cached_file(source, "model.safetensors")
        except OSError:  # nlpconnect's repository has only the .bin
            weights = cached_file(source, "pytorch_model.bin")
        result = model.load_state_dict(load_state_dict(weights), strict=False)
        model.tie_weights()  # GPT-2's lm_head is its token embedding, which a saved model holds once
        derived = ("attn.masked_bias", "attn.bias") + (("lm_head.weight",) if model.config.decoder.tie_word_embeddings else ())
        missing = [key for key in result.missing_keys if not key.endswith(derived)]
        if missing or result.unexpected_keys:
            raise RuntimeError(f"{source}: does not fit ViT-GPT2: missing {missing[:10]}, "
                               f"unexpected {result.unexpected_keys[:10]}")
        return model.eval()

    @torch.no_grad()
    def generate(self, samples: Mapping[str, Any], use_nucleus_sampling: bool = False, num_beams: int = 3,
                 max_length: int = 30, min_length: int = 5, top_p: float = 0.9, repetition_penalty: float = 1.0,
                 **kwargs: Any) -> list[str]:
        config = self.model.config
        output = self.model.generate(
            pixel_values=samples["image"], decoder_start_token_id=config.decoder_start_token_id,
            pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
            **self.search(use_nucleus_sampling, num_beams, max_length, min_length, top_p, repetition_penalty))
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]


@registry.register_model("instructblip_t5_caption")
class InstructBLIPT5Caption(HFCaptioner):
    """InstructBLIP: the instruction-aware Q-Former's queries → FLAN-T5, which reads them and the instruction."""

    HF_CLASS = InstructBlipForConditionalGeneration
    PRETRAINED_MODEL_CONFIG_DICT = {name: str(CONFIG_DIR / f"caption_instructblip_{name}.yaml")
                                    for name in ("flant5xl", "tiny")}

    def __init__(self, model: torch.nn.Module, tokenizer: Any, qformer_tokenizer: Any, prompt: str = ""):
        super().__init__(model, tokenizer, prompt)
        self.qformer_tokenizer = qformer_tokenizer

    @classmethod
    def random_model(cls, hf_config: Mapping[str, Any]) -> InstructBlipForConditionalGeneration:
        return InstructBlipForConditionalGeneration(InstructBlipConfig(**hf_config))

    @classmethod
    def assemble(cls, model: torch.nn.Module, tokenizer: Any, cfg: Mapping[str, Any]) -> "InstructBLIPT5Caption":
        if cfg.get("qformer_tokenizer"):
            qformer_tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, "qformer_tokenizer",
                                                           cfg["qformer_tokenizer"])
        else:  # the hub model keeps it in a subfolder
            qformer_tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, "pretrained",
                                                           cfg.get("pretrained"), subfolder="qformer_tokenizer")
        return cls(model, tokenizer, qformer_tokenizer, prompt=cfg.get("prompt", ""))

    def after_image_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The prompt after ``num_query_tokens`` image tokens, which the model replaces by the queries' outputs.

        transformers 4.57 takes the queries only there (``config.image_token_index``, as InstructBlipProcessor does);
        4.51 also puts them first by itself when the config has no image token, which this then leaves to it.
        """
        token = getattr(self.model.config, "image_token_index", None)
        if token is None:
            return input_ids, attention_mask
        ones = attention_mask.new_ones(input_ids.shape[0], self.model.config.num_query_tokens)
        return torch.cat([ones * token, input_ids], dim=1), torch.cat([ones, attention_mask], dim=1)

    @torch.no_grad()
    def generate(self, samples: Mapping[str, Any], use_nucleus_sampling: bool = False, num_beams: int = 3,
                 max_length: int = 30, min_length: int = 5, top_p: float = 0.9, repetition_penalty: float = 1.0,
                 **kwargs: Any) -> list[str]:
        image = samples["image"]
        prompts = samples.get("prompt") or [self.prompt] * image.shape[0]
        prompts = [prompts] * image.shape[0] if isinstance(prompts, str) else list(prompts)
        text = self.tokenizer(prompts, padding="longest", return_tensors="pt").to(image.device)
        qformer = self.qformer_tokenizer(prompts, padding="longest", truncation=True, max_length=128,
                                         return_tensors="pt").to(image.device)
        input_ids, attention_mask = self.after_image_tokens(text.input_ids, text.attention_mask)
        output = self.model.generate(
            pixel_values=image, input_ids=input_ids, attention_mask=attention_mask,
            qformer_input_ids=qformer.input_ids, qformer_attention_mask=qformer.attention_mask,
            **self.search(use_nucleus_sampling, num_beams, max_length, min_length, top_p, repetition_penalty))
        return [caption.strip() for caption in self.tokenizer.batch_decode(output, skip_special_tokens=True)]
