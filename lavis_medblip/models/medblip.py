"""MedBLIP (Chen & Hong, ACCV 2024): 3D brain MRI + EHR text → diagnosis, registered as ``medblip``.

    volume ─► 3D stem ─► frozen EVA ViT blocks ─► MedQFormer (queries) ─► projection ─► visual prefix
                                                        │ ITC with EHR text and with Q&A text
    prompt = [visual prefix, EHR text, "Question: … Answer:"] ─► frozen LM (+LoRA) ─► diagnosis

Samples (what the registered datasets yield):

- ``image``: float tensor (B, 1, S, S, S) from the ``mri_volume_*`` processors;
- ``text_input``: list of EHR descriptions;
- ``question`` (optional): list of questions, default the paper's diagnosis question;
- ``text_output`` (training): list of answers, e.g. the diagnosis.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F
from transformers import BertTokenizer
from transformers.utils import ModelOutput

from lavis.common.dist_utils import get_rank
from lavis.common.registry import registry
from lavis.models.base_model import concat_all_gather
from lavis.models.blip2_models.blip2 import Blip2Base, LayerNorm, disabled_train
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

from lavis_medblip.data.ehr import DIAGNOSIS_QUESTION
from lavis_medblip.models.feature_cache import VisionFeatureCache
from lavis_medblip.models.language_model import PROMPT_SEGMENTS, LanguageModel
from lavis_medblip.models.vision_3d import build_vit_3d, freeze_vit_blocks, load_vit_weights
from lavis_medblip.models.weights import (
    check_fits,
    from_pretrained_or_explain,
    read_checkpoint,
    read_state_dict,
    model_name,
    save_checkpoint_file,
    state_dict_of,
)

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Keys of a BLIP-2 checkpoint that MedBLIP does not use (ITG head, ITM head, the 2D ViT).
BLIP2_UNUSED_PREFIXES = ("Qformer.cls.", "itm_head.", "visual_encoder.")
BLIP2_QFORMER_PREFIXES = ("Qformer.", "query_tokens", "vision_proj.", "text_proj.", "temp", "ln_vision.")


@dataclass
class MedBLIPOutput(ModelOutput):
    """``loss = loss_itc_text + loss_itc_qa + lambda_lm * loss_lm`` (paper eq. 4–5); ``lambda_lm = 0`` skips the LM."""

    loss: torch.Tensor | None = None
    loss_itc_text: torch.Tensor | None = None
    loss_itc_qa: torch.Tensor | None = None
    loss_lm: torch.Tensor | None = None


@dataclass
class CandidateRanking:
    """``predict_answers``: per sample, length-normalised log-likelihood of each candidate."""

    scores: torch.Tensor  # (B, C) mean log-probability per answer token
    probs: torch.Tensor  # (B, C) softmax of scores over the candidates
    predictions: list[str]


def image_text_contrastive_loss(image_feats: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """BLIP-2's ITC: each text is matched by its most similar query; negatives come from all ranks.

    ``image_feats`` (B, queries, D) and ``text_feat`` (B, D) are L2-normalised. Gathered features
    carry no gradient (as in BLIP-2); the loss equals the single-process loss on the global batch.
    """
    image_feats_all = concat_all_gather(image_feats)
    text_feat_all = concat_all_gather(text_feat)
    sim_i2t = torch.einsum("bqd,td->btq", image_feats, text_feat_all).max(-1).values / temp
    sim_t2i = torch.einsum("td,bqd->tbq", text_feat, image_feats_all).max(-1).values / temp
    batch_size = image_feats.shape[0]
    targets = torch.arange(batch_size, device=image_feats.device) + get_rank() * batch_size
    return (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2


def copy_text_ffn_to_query_ffn(qformer: nn.Module) -> None:
    """Start the queries' feed-forward layers (``*_query``) from BERT's, as LAVIS's ``Blip2Qformer`` does.

    ``from_pretrained`` leaves them random (BERT has no such layers); a BLIP-2 checkpoint, when
    loaded afterwards, overwrites them with its trained values.
    """
    state = qformer.state_dict()
    with torch.no_grad():
        for name, parameter in qformer.named_parameters():
            if "_query" in name:
                parameter.copy_(state[name.replace("_query", "")])


def is_qformer_addition(name: str) -> bool:
    """Whether a parameter of the Q-Former's BERT is one the Q-Former adds (cross-attention, query FFN)."""
    return "crossattention" in name or "_query" in name


@registry.register_model("medblip")
class MedBLIP(Blip2Base):
    """The MedBLIP model family; ``model_type`` picks the LM and whether it has LoRA."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        name: str(CONFIG_DIR / f"medblip_{name}.yaml")  # absolute: LAVIS joins it to its own dir
        for name in ("biomedlm", "biomedlm_lora", "biogpt", "biogpt_lora", "flant5xl", "flant5xl_lora", "tiny", "demo")
    }

    def __init__(
        self,
        vision_encoder: nn.Module,
        qformer: nn.Module,
        query_tokens: nn.Parameter,
        tokenizer: BertTokenizer,
        language_model: LanguageModel,
        embed_dim: int = 256,
        max_text_len: int = 256,
        max_prompt_len: int = 256,
        max_answer_len: int = 32,
        lambda_lm: float = 1.0,
        prompt_order: Sequence[str] = PROMPT_SEGMENTS,
        question: str = DIAGNOSIS_QUESTION,
        freeze_vit: bool = True,
        freeze_vision_stem: bool = False,
        vision_feature_cache: str | os.PathLike | None = None,
        freeze_qformer_bert: bool = False,
    ):
        super().__init__()
        if sorted(prompt_order) != sorted(PROMPT_SEGMENTS):
            raise ValueError(f"prompt_order must order {list(PROMPT_SEGMENTS)}, got {list(prompt_order)}")
        if vision_feature_cache and not freeze_vision_stem:
            raise ValueError(
                f"model.vision_feature_cache is set ({vision_feature_cache}) but model.freeze_vision_stem is "
                f"false: cached ViT outputs would go stale as the 3D stem trains. Set freeze_vision_stem: true "
                f"(e.g. a second stage training only the Q-Former and LoRA) or vision_feature_cache: null."
            )
        self.visual_encoder = vision_encoder
        if freeze_vit:  # frozen blocks stay in eval mode, as in BLIP-2
            self.visual_encoder.train = disabled_train.__get__(self.visual_encoder)
        if freeze_vision_stem:  # the whole vision path (stem, CLS token, ViT blocks) is frozen
            for parameter in vision_encoder.parameters():
                parameter.requires_grad = False
        self.feature_cache = VisionFeatureCache(vision_feature_cache, vision_encoder) if vision_feature_cache else None
        self.ln_vision = LayerNorm(vision_encoder.num_features)
        self.Qformer = qformer
        if freeze_qformer_bert:  # keeps a small BERT's pretraining; the text branch then needs no backward
            for name, parameter in qformer.bert.named_parameters():
                parameter.requires_grad = is_qformer_addition(name)
        self.query_tokens = query_tokens
        self.tokenizer = tokenizer
        hidden = qformer.config.hidden_size
        self.vision_proj = nn.Linear(hidden, embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.temp = nn.Parameter(0.07 * torch.ones([]))
        self.language_model = language_model
        self.llm_proj = nn.Linear(hidden, language_model.hidden_size)
        self.max_text_len = max_text_len
        self.max_prompt_len = max_prompt_len
        self.max_answer_len = max_answer_len
        self.lambda_lm = lambda_lm
        self.prompt_order = tuple(prompt_order)
        self.question = question
        self.finetuned_keys: set[str] = set()  # loaded by load_checkpoint: later checkpoints keep them

    # ---- construction -----------------------------------------------------------------------------
    @classmethod
    def init_Qformer(
        cls,
        num_query_token: int,
        vision_width: int,
        cross_attention_freq: int = 2,
        bert: str = "bert-base-uncased",
        load_bert_weights: bool = True,
        config_overrides: Mapping[str, Any] | None = None,
    ) -> tuple[BertLMHeadModel, nn.Parameter]:
        """LAVIS's Q-Former, with the BERT source (hub name or folder) and size configurable."""
        if load_bert_weights:
            config = from_pretrained_or_explain(BertConfig.from_pretrained, "qformer_bert", bert)
        else:
            config = BertConfig.from_pretrained(bert) if os.path.isfile(os.path.join(bert, "config.json")) else BertConfig()
        for key, value in dict(config_overrides or {}).items():
            setattr(config, key, value)
        config.encoder_width = vision_width
        config.add_cross_attention = True
        config.cross_attention_freq = cross_attention_freq
        config.query_length = num_query_token
        if load_bert_weights:
            qformer = from_pretrained_or_explain(BertLMHeadModel.from_pretrained, "qformer_bert", bert, config=config)
        else:
            qformer = BertLMHeadModel(config)
        query_tokens = nn.Parameter(torch.zeros(1, num_query_token, config.hidden_size))
        query_tokens.data.normal_(mean=0.0, std=config.initializer_range)
        return qformer, query_tokens

    @classmethod
    def init_tokenizer(cls, bert: str = "bert-base-uncased") -> BertTokenizer:
        """The Q-Former's BERT tokenizer (for the ITC text branch), as LAVIS builds it."""
        tokenizer = from_pretrained_or_explain(BertTokenizer.from_pretrained, "qformer_bert", bert)
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        return tokenizer

    @classmethod
    def from_config(cls, cfg: Any) -> "MedBLIP":
        """Build from a model config (``configs/medblip_*.yaml``), then load the configured weights.

        Parts without pretrained weights are initialised from ``init_seed`` (default 0), whatever
        the global RNG state, so that a checkpoint of trainable parameters always fits the same
        frozen backbone; the global RNG is left as it was.
        """
        cfg = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.get("init_seed", 0))
            model = cls._build(cfg)
        model.config = cfg
        if cfg.get("qformer_pretrained"):
            model.load_from_pretrained(cfg["qformer_pretrained"])
        if cfg.get("load_finetuned") and cfg.get("finetuned"):
            model.load_checkpoint(cfg["finetuned"])
        return model

    @classmethod
    def _build(cls, cfg: dict[str, Any]) -> "MedBLIP":
        vit = build_vit_3d(
            vit_model=cfg.get("vit_model", "eva_clip_g"),
            image_size=cfg.get("image_size", 224),
            patch_size=cfg.get("patch_size", 32),
            patch_stride=cfg.get("patch_stride"),
            vit_arch=cfg.get("vit_arch"),
            use_grad_checkpoint=cfg.get("vit_grad_checkpoint", False),
        )
        if cfg.get("vit_weights"):
            load_vit_weights(vit, cfg["vit_weights"])
        freeze_vit_blocks(vit, cfg.get("vit_precision", "fp16"), freeze=cfg.get("freeze_vit", True))

        bert = cfg.get("qformer_bert", "bert-base-uncased")
        tokenizer = cls.init_tokenizer(bert)
        qformer, query_tokens = cls.init_Qformer(
            cfg.get("num_query_token", 32), vit.num_features, cfg.get("cross_attention_freq", 2),
            bert=bert, load_bert_weights=cfg.get("qformer_load_bert_weights", True),
            config_overrides=cfg.get("qformer_config_overrides"),
        )
        qformer.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # [DEC] starts random, as in LAVIS
        if cfg.get("qformer_load_bert_weights", True):
            copy_text_ffn_to_query_ffn(qformer)
        qformer.cls = None  # no image-grounded text generation in MedBLIP: the LM speaks
        model = cls(
            vision_encoder=vit,
            qformer=qformer,
            query_tokens=query_tokens,
            tokenizer=tokenizer,
            language_model=LanguageModel.from_config(cfg),
            embed_dim=cfg.get("embed_dim", 256),
            max_text_len=cfg.get("max_text_len", 256),
            max_prompt_len=cfg.get("max_prompt_len", 256),
            max_answer_len=cfg.get("max_answer_len", 32),
            lambda_lm=cfg.get("lambda_lm", 1.0),
            prompt_order=cfg.get("prompt_order", PROMPT_SEGMENTS),
            question=cfg.get("question", DIAGNOSIS_QUESTION),
            freeze_vit=cfg.get("freeze_vit", True),
            freeze_vision_stem=cfg.get("freeze_vision_stem", False),
            vision_feature_cache=cfg.get("vision_feature_cache"),
            freeze_qformer_bert=cfg.get("freeze_qformer_bert", False),
        )
        return model

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

    def itc_loss(self, image_feats: torch.Tensor, text_feat: torch.Tensor) -> torch.Tensor:
        return image_text_contrastive_loss(image_feats, text_feat, self.temp)

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

    # ---- training ---------------------------------------------------------------------------------
    def forward(self, samples: Mapping[str, Any]) -> MedBLIPOutput:
        image = samples["image"]
        ehr_texts = list(samples["text_input"])
        answers = list(samples["text_output"])
        batch_size = image.shape[0]
        if not (len(ehr_texts) == len(answers) == batch_size):
            raise ValueError(f"batch sizes differ: image {batch_size}, text_input {len(ehr_texts)}, "
                             f"text_output {len(answers)}")
        questions = self._questions(samples, batch_size)

        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        query_output, prefix = self.visual_prefix(image)
        image_feats = F.normalize(self.vision_proj(query_output), dim=-1)
        loss_itc_text = self.itc_loss(image_feats, self.encode_text(ehr_texts))
        qa_texts = [f"{question} {answer}" for question, answer in zip(questions, answers)]
        loss_itc_qa = self.itc_loss(image_feats, self.encode_text(qa_texts))

        if self.lambda_lm == 0:  # an LM-free Q-Former stage (as BLIP-2's first): skip the costly LM forward
            loss_lm = prefix.new_zeros(())
        else:
            batch = self.language_model.build_batch(
                prefix, self._prompt_ids(ehr_texts, questions), self.prompt_order, self._answer_ids(answers)
            )
            with self.maybe_autocast():
                loss_lm = self.language_model.loss(batch)
        loss = loss_itc_text + loss_itc_qa + self.lambda_lm * loss_lm
        return MedBLIPOutput(loss=loss, loss_itc_text=loss_itc_text, loss_itc_qa=loss_itc_qa, loss_lm=loss_lm)

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
        """Greedy (``num_beams=1``) or beam-search answers, one string per sample."""
        image = samples["image"]
        questions = self._questions(samples, image.shape[0])
        _, prefix = self.visual_prefix(image)
        batch = self.language_model.build_batch(
            prefix, self._prompt_ids(samples["text_input"], questions), self.prompt_order, left_pad=True
        )
        with self.maybe_autocast():
            return self.language_model.generate(
                batch, num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                length_penalty=length_penalty, repetition_penalty=repetition_penalty, do_sample=do_sample,
                **generate_kwargs,
            )

    @torch.no_grad()
    def predict_answers(
        self, samples: Mapping[str, Any], candidates: Sequence[str] | Sequence[Sequence[str]], **kwargs: Any
    ) -> CandidateRanking:
        """Rank candidate answers by length-normalised LM log-likelihood (deterministic zero-shot).

        ``candidates`` is one list for the whole batch (e.g. class answers) or one list per sample
        (e.g. multiple-choice options); every sample must have the same number of candidates.
        """
        image = samples["image"]
        batch_size = image.shape[0]
        per_sample = [list(candidates)] * batch_size if isinstance(candidates[0], str) else [list(c) for c in candidates]
        num_candidates = len(per_sample[0])
        if any(len(options) != num_candidates for options in per_sample) or len(per_sample) != batch_size:
            raise ValueError("predict_answers needs the same number of candidates for every sample")
        questions = self._questions(samples, batch_size)
        _, prefix = self.visual_prefix(image)

        repeat = lambda values: [value for value in values for _ in range(num_candidates)]  # noqa: E731
        flat_candidates = [option for options in per_sample for option in options]
        batch = self.language_model.build_batch(
            prefix.repeat_interleave(num_candidates, dim=0),
            self._prompt_ids(repeat(samples["text_input"]), repeat(questions)),
            self.prompt_order,
            self._answer_ids(flat_candidates),
        )
        with self.maybe_autocast():
            total, count = self.language_model.answer_log_likelihood(batch)
        scores = (total / count.clamp(min=1)).view(batch_size, num_candidates)
        best = scores.argmax(dim=1).tolist()
        return CandidateRanking(scores=scores, probs=scores.softmax(dim=1),
                                predictions=[per_sample[i][best[i]] for i in range(batch_size)])

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the trainable parameters and those loaded from an earlier checkpoint.

        A later stage that freezes parts an earlier one trained (e.g. the 3D stem, so that the vision
        features can be cached) still passes them on; everything else is the backbones' init.
        """
        keys = {name for name, p in self.named_parameters() if p.requires_grad} | self.finetuned_keys
        return {name: p.detach().cpu() for name, p in self.named_parameters() if name in keys}

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """:meth:`checkpoint_state_dict` plus the model config, written atomically; loads on top of the frozen backbones."""
        save_checkpoint_file({"model": self.checkpoint_state_dict(), "config": getattr(self, "config", None)}, path)

    def load_checkpoint(self, url_or_filename: str) -> None:
        """Load a checkpoint of trainable parameters (ours, or a LAVIS runner's).

        Unexpected keys, missing trainable keys and shape mismatches are a :class:`CheckpointError`
        (see :func:`check_fits`); frozen weights come from the backbones.
        """
        checkpoint = read_checkpoint(url_or_filename, key="finetuned")
        state_dict = state_dict_of(checkpoint, url_or_filename)
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        check_fits(url_or_filename, checkpoint, self.state_dict(), required=trainable,
                   this_model=model_name(getattr(self, "config", None)))
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
        expected = {key for key in self.state_dict() if key.startswith(BLIP2_QFORMER_PREFIXES)}
        missing = sorted(expected - set(state_dict))
        own = self.state_dict()
        mismatched = [key for key in state_dict if key in own and own[key].shape != state_dict[key].shape]
        if unexpected or missing or mismatched:
            raise RuntimeError(
                f"Q-Former checkpoint {url_or_filename} does not fit: unexpected keys {unexpected[:10]}, "
                f"missing keys {missing[:10]}, shape mismatches {mismatched[:10]} "
                f"(set model.qformer_pretrained: null to start from the BERT weights)"
            )
        self.load_state_dict(state_dict, strict=False)
        logger.info("Loaded BLIP-2 Q-Former weights from %s (unused parts: %s)", url_or_filename, unused)
