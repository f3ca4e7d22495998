"""MedBLIP (Chen & Hong, ACCV 2024): 3D brain MRI + EHR text → diagnosis, registered as ``medblip``.
The model assembles its parts (vision path, Q-Former, LM adapter) and holds the losses, the
inference (generation, ranking of candidate answers) and the checkpoints.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import BertTokenizer
from transformers.utils import ModelOutput

from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm, disabled_train
from lavis.models.blip2_models.Qformer import BertLMHeadModel

from lavis_medblip.models.bundle import BundleMixin, is_bundle, read_model_file, required_file
from lavis_medblip.models.calibration import Calibration
from lavis_medblip.models.config import MODEL_TYPES, ComposedConfigPath, MedBLIPConfig, model_type_file
from lavis_medblip.models.explain import explain as explain_relevance
from lavis_medblip.models.feature_cache import VisionFeatureCache
from lavis_medblip.models.language_model import LanguageModel
from lavis_medblip.models.losses import image_text_contrastive_loss, labelled_rows, masked_lm_loss
from lavis_medblip.models.qformer import build_qformer, is_qformer_addition
from lavis_medblip.models.vision_3d import build_vision_encoder, freeze_vit_blocks
from lavis_medblip.models.weights import check_fits, model_name, read_state_dict, state_dict_of
from lavis_medblip.storage import atomic_save

logger = logging.getLogger(__name__)

#: Keys of a BLIP-2 checkpoint that MedBLIP does not use (ITG head, ITM head, the 2D ViT).
BLIP2_UNUSED_PREFIXES = ("Qformer.cls.", "itm_head.", "visual_encoder.")
BLIP2_QFORMER_PREFIXES = ("Qformer.", "query_tokens", "vision_proj.", "text_proj.", "temp", "ln_vision.")


@dataclass
class MedBLIPOutput(ModelOutput):
    """``loss`` = the weighted sum of the terms (paper eq. 4–5); a term whose weight is 0 is ``None``, and so
    are ITC(image, Q&A) and LM in a batch without an answered row under ``unlabelled_rows: itc_text_only``."""

    loss: torch.Tensor | None = None
    loss_itc_text: torch.Tensor | None = None
    loss_itc_qa: torch.Tensor | None = None
    loss_lm: torch.Tensor | None = None


@dataclass
class CandidateRanking:
    """``predict_answers``: per sample, the raw length-normalised log-likelihood of each candidate."""

    scores: torch.Tensor  # (B, C) mean log-probability per answer token
    probs: torch.Tensor  # (B, C) softmax over the candidates of the scores after model.calibration
    predictions: list[str]  # the candidate with the highest calibrated score


@registry.register_model("medblip")
class MedBLIP(BundleMixin, Blip2Base):
    """The MedBLIP model family; ``model_type`` picks the LM and whether it has LoRA::

        volume ─► 3D stem ─► frozen EVA ViT blocks ─► MedQFormer (queries) ─► projection ─► visual prefix
                                                            │ ITC with EHR text and with Q&A text
        prompt = [visual prefix, EHR text, "Question: … Answer:"] ─► frozen LM (+LoRA) ─► diagnosis
    """

    PRETRAINED_MODEL_CONFIG_DICT = {
        name: str(model_type_file(name)) for name in MODEL_TYPES  # each reads as a whole: default_config_path
    }

    def __init__(
        self,
        config: MedBLIPConfig,
        vision_encoder: nn.Module,
        qformer: BertLMHeadModel,
        query_tokens: nn.Parameter,
        tokenizer: BertTokenizer,
        language_model: LanguageModel,
    ):
        """Assemble the built parts (see :meth:`build`); ``config`` also says what trains and how prompts read."""
        super().__init__()
        self.config = config
        self.visual_encoder = vision_encoder
        freeze_vit_blocks(vision_encoder, config.freeze_vit, config.vision.train_cls_token)
        if config.freeze_vit:  # frozen blocks stay in eval mode, as in BLIP-2
            self.visual_encoder.eval()
            self.visual_encoder.train = disabled_train.__get__(self.visual_encoder)
        if config.freeze_vision_stem:  # the whole vision path (stem, CLS token, ViT blocks) is frozen
            for parameter in vision_encoder.parameters():
                parameter.requires_grad = False
        cache = config.vision_feature_cache
        self.feature_cache = VisionFeatureCache(cache, vision_encoder) if cache else None
        self.ln_vision = LayerNorm(vision_encoder.num_features)
        self.Qformer = qformer
        if config.freeze_qformer_bert:  # keeps a small BERT's pretraining; the text branch then needs no backward
            for name, parameter in qformer.bert.named_parameters():
                parameter.requires_grad = is_qformer_addition(name)
        self.query_tokens = query_tokens
        self.tokenizer = tokenizer
        hidden = qformer.config.hidden_size
        self.vision_proj = nn.Linear(hidden, config.qformer.embed_dim)
        self.text_proj = nn.Linear(hidden, config.qformer.embed_dim)
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.language_model = language_model
        self.llm_proj = nn.Linear(hidden, language_model.hidden_size)
        self.max_text_len = config.qformer.max_text_len
        self.max_prompt_len = config.max_prompt_len
        self.max_answer_len = config.max_answer_len
        self.prompt_order = tuple(config.prompt_order)
        self.question = config.question
        self.finetuned_keys: set[str] = set()  # loaded by load_checkpoint: later checkpoints keep them
        self.calibration = Calibration()  # of probs and predictions; the identity unless a checkpoint holds one

    @property
    def device(self) -> torch.device:
        # LAVIS lists every parameter for this (8 ms here), and maybe_autocast asks twice per forward
        return next(self.parameters()).device

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def default_config_path(cls, model_type: str) -> ComposedConfigPath:
        """The model type's YAML, the whole config when ``OmegaConf.load`` reads it (as every LAVIS loader does:
        :class:`ComposedConfigPath`), or a bundle folder's ``config.yaml`` (``load_model_and_preprocess`` takes one)."""
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT and is_bundle(model_type):
            return required_file(model_type, "config.yaml")
        if model_type not in cls.PRETRAINED_MODEL_CONFIG_DICT:
            available = list(cls.PRETRAINED_MODEL_CONFIG_DICT)
            raise ValueError(f"unknown medblip model type {model_type!r}. Available: {available}")
        return ComposedConfigPath(cls.PRETRAINED_MODEL_CONFIG_DICT[model_type])

    @classmethod
    def from_config(cls, cfg: MedBLIPConfig | Mapping[str, Any]) -> "MedBLIP":
        """Build from a model config (:class:`MedBLIPConfig`, or a ``model:`` section), then load its weights.

        Parts without pretrained weights are initialised from ``init_seed``, whatever the global RNG
        state, so that a checkpoint of trainable parameters always fits the same frozen backbone;
        the global RNG is left as it was.
        """
        config = cfg if isinstance(cfg, MedBLIPConfig) else MedBLIPConfig.from_dict(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            model = cls.build(config)
        if config.qformer_pretrained:
            model.load_from_pretrained(config.qformer_pretrained)
        if config.load_finetuned and config.finetuned:
            model.load_checkpoint(config.finetuned)
        return model

    @classmethod
    def build(cls, config: MedBLIPConfig) -> "MedBLIP":
        """The parts in a fixed order (the random ones draw from the RNG in it), each from its own section."""
        vision_encoder = build_vision_encoder(config.vision, config.image_size)
        qformer, query_tokens, tokenizer = build_qformer(config.qformer, vision_encoder.num_features)
        language_model = LanguageModel.from_config(config.lm)
        return cls(config, vision_encoder, qformer, query_tokens, tokenizer, language_model)

    # ---- encoders ---------------------------------------------------------------------------------
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Volumes (B, 1, S, S, S) → ViT tokens (B, N+1, vit width), after ``ln_vision``.

        With ``vision_feature_cache`` the (frozen) encoder's tokens come from the cache; the
        trainable ``ln_vision`` always runs live.
        """
        if self.feature_cache is not None:
            tokens = self.feature_cache.tokens(image, self._vision_tokens)
        else:
            tokens = self._vision_tokens(image)
        return self.ln_vision(tokens)

    def _vision_tokens(self, image: torch.Tensor) -> torch.Tensor:
        with self.maybe_autocast():  # on GPU, fp16 ViT blocks behind an fp32 stem
            return self.visual_encoder.forward_features(image)

    def encode_queries(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """ViT tokens → query outputs (B, num_query_token, Q-Former width)."""
        image_embeds = image_embeds.float()
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        output = self.Qformer.bert(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        return output.last_hidden_state

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts → normalised ITC features (B, embed_dim) from the Q-Former's text branch ([CLS])."""
        tokens = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_text_len,
                                return_tensors="pt").to(self.query_tokens.device)
        output = self.Qformer.bert(tokens.input_ids, attention_mask=tokens.attention_mask, return_dict=True)
        return F.normalize(self.text_proj(output.last_hidden_state[:, 0, :]), dim=-1)

    def itc_loss(self, image_feats: torch.Tensor, text_feat: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return image_text_contrastive_loss(image_feats, text_feat, self.temp, rows)

    # ---- prompts ----------------------------------------------------------------------------------
    def _questions(self, samples: Mapping[str, Any], batch_size: int) -> list[str]:
        questions = samples.get("question")
        if questions is None:
            return [self.question] * batch_size
        return [questions] * batch_size if isinstance(questions, str) else list(questions)

    def _prompt_ids(self, ehr_texts: Sequence[str], questions: Sequence[str]) -> dict[str, list[list[int]]]:
        lm = self.language_model
        # a leading space keeps BPE tokens word-initial where a segment follows another
        return {
            "text": lm.tokenize(list(ehr_texts), self.max_prompt_len),
            "question": lm.tokenize([" " + question for question in questions], self.max_prompt_len),
        }

    def _answer_ids(self, answers: Sequence[str]) -> list[list[int]]:
        prefix = "" if self.language_model.is_encoder_decoder else " "
        return self.language_model.tokenize([prefix + answer for answer in answers], self.max_answer_len)

    def visual_prefix(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query outputs and their projection into the LM's embedding space."""
        query_output = self.encode_queries(self.encode_image(image))
        return query_output, self.llm_proj(query_output)

    def no_visual_prefix(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """An empty prefix (B, 0, LM width): the text-only LM's prompt holds no image tokens."""
        return torch.zeros(batch_size, 0, self.language_model.hidden_size, device=device)

    def _lm_prefix(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual_prefix(image)[1] if self.config.uses_image else self.no_visual_prefix(image.shape[0], image.device)

    # ---- training ---------------------------------------------------------------------------------
    def forward(self, samples: Mapping[str, Any]) -> MedBLIPOutput:
        """The training losses of one batch.

        Args:
            samples: what the registered datasets yield: ``image``, a float tensor (B, 1, S, S, S)
                from the ``mri_volume_*`` processors; ``text_input``, a list of EHR descriptions;
                ``question`` (optional), a list of questions, default the paper's diagnosis
                question; ``text_output``, a list of answers, e.g. the diagnosis.
        """
        image = samples["image"]
        ehr_texts = list(samples["text_input"])
        answers = list(samples["text_output"])
        batch_size = image.shape[0]
        if not (len(ehr_texts) == len(answers) == batch_size):
            raise ValueError(f"batch sizes differ: image {batch_size}, text_input {len(ehr_texts)}, "
                             f"text_output {len(answers)}")
        questions = self._questions(samples, batch_size)

        loss_cfg = self.config.loss
        rows = labelled_rows(answers, loss_cfg.unlabelled_rows, image.device)  # None: every row in every term
        terms: dict[str, torch.Tensor] = {}
        if self.config.uses_image:
            # 1. the image through the vision path and the Q-Former's queries
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            query_output, prefix = self.visual_prefix(image)
            image_feats = F.normalize(self.vision_proj(query_output), dim=-1)
            # 2. ITC(image, EHR text) and ITC(image, question + answer); a weight of 0 drops its term
            if loss_cfg.lambda_itc_text > 0:
                terms["loss_itc_text"] = self.itc_loss(image_feats, self.encode_text(ehr_texts))
            if loss_cfg.lambda_itc_qa > 0:
                qa_texts = [f"{question} {answer}" for question, answer in zip(questions, answers)]
                terms["loss_itc_qa"] = self.itc_loss(image_feats, self.encode_text(qa_texts), rows)
        else:  # the text-only LM (prompt_order without "image"): no visual prefix
            prefix = self.no_visual_prefix(batch_size, image.device)
        # 3. the LM on [visual prefix, EHR text, question] → answer; an LM-free stage skips its costly forward
        if loss_cfg.lambda_lm > 0:
            batch = self.language_model.build_batch(
                prefix, self._prompt_ids(ehr_texts, questions), self.prompt_order, self._answer_ids(answers)
            )
            with self.maybe_autocast():  # unanswered rows run too (distributed ranks stay in step), masked out
                terms["loss_lm"] = masked_lm_loss(*self.language_model.answer_log_likelihood(batch), rows)
        weights = {"loss_itc_text": loss_cfg.lambda_itc_text, "loss_itc_qa": loss_cfg.lambda_itc_qa,
                   "loss_lm": loss_cfg.lambda_lm}
        loss = sum(weights[name] * value for name, value in terms.items())
        if rows is not None and not rows.any():  # their zero stays in the loss, but is no measurement to log
            terms = {name: value for name, value in terms.items() if name == "loss_itc_text"}
        return MedBLIPOutput(loss=loss, **terms)

    # ---- inference --------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        samples: Mapping[str, Any],
        num_beams: int = 1,
        max_new_tokens: int = 32,
        min_new_tokens: int = 1,
        length_penalty: float = 1.0,
        repetition_penalty: float = 1.0,
        do_sample: bool = False,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Greedy (``num_beams=1``) or beam-search answers, one string per sample.

        ``samples`` are as for :meth:`forward`, without ``text_output``.
        """
        image = samples["image"]
        questions = self._questions(samples, image.shape[0])
        prefix = self._lm_prefix(image)
        batch = self.language_model.build_batch(
            prefix, self._prompt_ids(samples["text_input"], questions), self.prompt_order, left_pad=True
        )
        with self.maybe_autocast():
            return self.language_model.generate(
                batch, num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                length_penalty=length_penalty, repetition_penalty=repetition_penalty, do_sample=do_sample,
                **generate_kwargs,
            )

    def score_candidates(self, samples: Mapping[str, Any], candidates: Sequence[Any]) -> tuple[torch.Tensor, list[list[str]]]:
        """:meth:`predict_answers`' raw scores (B, C) and candidates per sample, with autograd as the caller has it."""
        image, batch_size = samples["image"], samples["image"].shape[0]
        per_sample = [list(candidates)] * batch_size if isinstance(candidates[0], str) else [list(c) for c in candidates]
        num_candidates = len(per_sample[0])
        if any(len(options) != num_candidates for options in per_sample) or len(per_sample) != batch_size:
            raise ValueError("predict_answers needs the same number of candidates for every sample")
        questions = self._questions(samples, batch_size)
        prompt = self.language_model.build_batch(self._lm_prefix(image), self._prompt_ids(
            samples["text_input"], questions), self.prompt_order, left_pad=True)
        flat_candidates = [option for options in per_sample for option in options]
        with self.maybe_autocast():  # each prompt runs once, its candidates share it (shared-prefix ranking)
            total, count = self.language_model.score_answers(prompt, self._answer_ids(flat_candidates), num_candidates)
        return (total / count.clamp(min=1)).view(batch_size, num_candidates), per_sample

    @torch.no_grad()
    def predict_answers(
        self, samples: Mapping[str, Any], candidates: Sequence[str] | Sequence[Sequence[str]], **kwargs: Any
    ) -> CandidateRanking:
        """Rank candidate answers by length-normalised LM log-likelihood (deterministic zero-shot).

        Args:
            samples: as for :meth:`forward`, without ``text_output``.
            candidates: one list for the whole batch (e.g. class answers) or one list per sample (e.g.
                multiple-choice options); every sample must have the same number of candidates.
        """
        scores, per_sample = self.score_candidates(samples, candidates)
        logits = self.calibration.logits(scores, per_sample)  # the scores themselves when uncalibrated
        best = logits.argmax(dim=1).tolist()
        return CandidateRanking(scores, logits.softmax(dim=1), [options[i] for options, i in zip(per_sample, best)])

    def explain(self, samples: Mapping[str, Any], answer: Any = None, method: str = "gradient", **kwargs: Any) -> torch.Tensor:
        """Relevance maps (B, S, S, S) of an answer (default: the predicted class's); see :mod:`~.explain`."""
        return explain_relevance(self, samples, answer=answer, method=method, **kwargs)

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the trainable parameters and those loaded from an earlier checkpoint.

        A later stage that freezes parts an earlier one trained (e.g. the 3D stem, so that the vision
        features can be cached) still passes them on; everything else is the backbones' init.
        """
        keys = {name for name, p in self.named_parameters() if p.requires_grad} | self.finetuned_keys
        return {name: p.detach().cpu() for name, p in self.named_parameters() if name in keys}

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """:meth:`checkpoint_state_dict`, the model config and a fitted calibration, written atomically."""
        atomic_save({"model": self.checkpoint_state_dict(), "config": self.config.to_dict(),
                     **self.calibration.checkpoint_entry()}, path)

    def load_checkpoint(self, url_or_filename: str) -> None:
        """Load a checkpoint of trainable parameters (ours, a LAVIS runner's, or a bundle folder's). Unexpected keys,
        missing trainable keys and shape mismatches are a :class:`CheckpointError` (see :func:`check_fits`); frozen
        weights come from the backbones, the calibration from the checkpoint (or none)."""
        checkpoint, url_or_filename = read_model_file(url_or_filename)  # a bundle: its model.safetensors
        state_dict = state_dict_of(checkpoint, url_or_filename)
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        check_fits(url_or_filename, checkpoint, self.state_dict(), required=trainable,
                   this_model=model_name(self.config.to_dict()))
        self.calibration = Calibration.from_checkpoint(checkpoint, url_or_filename)  # checked before the weights load
        self.load_state_dict(state_dict, strict=False)
        self.finetuned_keys |= set(state_dict)
        logger.info("Loaded %d tensors from %s", len(state_dict), url_or_filename)

    def load_from_pretrained(self, url_or_filename: str) -> None:
        """Load a BLIP-2 Q-Former checkpoint (LAVIS's ``blip2_pretrained.pth`` layout)."""
        state_dict = read_state_dict(url_or_filename, key="qformer_pretrained")
        unused = sorted({key.split(".")[0] + "." + key.split(".")[1] if key.startswith("Qformer.cls") else key.split(".")[0]
                         for key in state_dict if key.startswith(BLIP2_UNUSED_PREFIXES)})
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(BLIP2_UNUSED_PREFIXES)}
        unexpected = [key for key in state_dict if not key.startswith(BLIP2_QFORMER_PREFIXES)]
        own = self.state_dict()
        missing = sorted({key for key in own if key.startswith(BLIP2_QFORMER_PREFIXES)} - set(state_dict))
        mismatched = [key for key in state_dict if key in own and own[key].shape != state_dict[key].shape]
        if unexpected or missing or mismatched:
            raise RuntimeError(
                f"Q-Former checkpoint {url_or_filename} does not fit: unexpected keys {unexpected[:10]}, "
                f"missing keys {missing[:10]}, shape mismatches {mismatched[:10]} "
                f"(set model.qformer_pretrained: null to start from the BERT weights)"
            )
        self.load_state_dict(state_dict, strict=False)
        logger.info("Loaded BLIP-2 Q-Former weights from %s (unused parts: %s)", url_or_filename, unused)
