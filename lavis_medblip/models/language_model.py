"""The frozen language model behind MedBLIP, decoder-only or encoder-decoder, optionally with LoRA:
one adapter that lays out prompts, scores answers and generates for either family.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.pytorch_utils import Conv1D

from lavis_medblip.models.config import LM_DTYPES, LanguageModelConfig, LoRAConfig
from lavis_medblip.models.precision import lm_autocast
from lavis_medblip.models.weights import from_pretrained_or_explain

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DTYPES = {name: getattr(torch, name) for name in LM_DTYPES}


@dataclass
class PromptBatch:
    """A batch laid out for the LM: embeddings, mask and (for training/scoring) answer labels."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor | None = None  # decoder-only: aligned with inputs; seq2seq: decoder targets


class LanguageModel(nn.Module):
    """A Hugging Face LM and its tokenizer, frozen, with optional LoRA; it hides the two families:

    - decoder-only (GPT-2-style BioMedLM, BioGPT, any Llama-family LM) via ``AutoModelForCausalLM``:
      the answer follows the prompt in one sequence, and the loss is shifted by one;
    - encoder-decoder (T5) via ``AutoModelForSeq2SeqLM``: the prompt goes to the encoder, the answer
      is the decoder's target.

    The loss is taken on answer tokens only.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, autocast: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.autocast_mode = autocast  # model.lm.autocast
        self.is_encoder_decoder = bool(model.config.is_encoder_decoder)
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's wrapper
        # Llama-family LMs compute logits at chosen positions only: a 49k-word vocabulary over every
        # prompt position is a fifth of a CPU training step, and only the answer positions are scored.
        self.keeps_chosen_logits = "logits_to_keep" in inspect.signature(causal_lm.forward).parameters
        self.takes_position_ids = "position_ids" in inspect.signature(causal_lm.forward).parameters
        self._packs_answers: bool | None = None  # see packs_answers
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the LM tokenizer {type(tokenizer).__name__} has no eos token; "
                             f"set model.lm.tokenizer_kwargs.eos_token")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # padding is masked out, any id will do

    @classmethod
    def from_config(cls, config: LanguageModelConfig) -> "LanguageModel":
        """Build from ``model.lm``: a pretrained LM (or a random one of ``config_overrides``), frozen, with LoRA."""
        name, remote, gguf_file = config.model, config.trust_remote_code, config.gguf_file
        dtype = DTYPES[config.dtype]
        attention = {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}
        tokenizer_source = config.tokenizer or name
        if tokenizer_source is None:
            raise ValueError("set model.lm.tokenizer (or model.lm.model) to a tokenizer name or folder")
        tokenizer_kwargs = dict(config.tokenizer_kwargs or {})
        if gguf_file and tokenizer_source == name:
            tokenizer_kwargs["gguf_file"] = gguf_file
        tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, "lm.tokenizer", tokenizer_source,
                                               trust_remote_code=remote, **tokenizer_kwargs)
        if config.config_overrides:  # random init from an explicit architecture (tiny CPU configs)
            overrides = dict(config.config_overrides)
            lm_config = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
            auto = AutoModelForSeq2SeqLM if lm_config.is_encoder_decoder else AutoModelForCausalLM
            model = auto.from_config(lm_config, torch_dtype=dtype, **attention)
        else:
            gguf = {"gguf_file": gguf_file} if gguf_file else {}
            lm_config = from_pretrained_or_explain(AutoConfig.from_pretrained, "lm.model", name,
                                                   trust_remote_code=remote, **gguf)
            if config.num_layers is not None:  # config attribute maps give every family this name
                lm_config.num_hidden_layers = min(config.num_layers, lm_config.num_hidden_layers)
            auto = AutoModelForSeq2SeqLM if lm_config.is_encoder_decoder else AutoModelForCausalLM
            model = from_pretrained_or_explain(auto.from_pretrained, "lm.model", name, config=lm_config,
                                               torch_dtype=dtype, trust_remote_code=remote, **gguf, **attention)
        for parameter in model.parameters():
            parameter.requires_grad = False
        if config.lora.enabled:
            model = _add_lora(model, config.lora)
        return cls(model, tokenizer, autocast=config.autocast)

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids per text, without special tokens, each cut to ``max_length``."""
        ids = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_length)
        return ids["input_ids"]

    # ---- layout ---------------------------------------------------------------------------------
    def build_batch(
        self,
        visual_embeds: torch.Tensor,
        prompt_ids: Mapping[str, list[list[int]]],
        order: Sequence[str],
        answer_ids: list[list[int]] | None = None,
        left_pad: bool = False,
    ) -> PromptBatch:
        """Lay out ``order`` segments (``image`` = visual embeds, others = token ids) per sample.

        Decoder-only: ``[prompt..., answer, eos]``, labels on the answer. Seq2seq: the prompt goes to
        the encoder, ``[answer, eos]`` is the decoder target.

        Args:
            visual_embeds: the visual prefix (B, queries, LM width).
            prompt_ids: token ids per segment name and sample, e.g. ``text`` (the EHR text) and
                ``question``.
            order: the prompt's segments in order (paper eq. 2), e.g. ``("image", "text", "question")``.
            answer_ids: the answers' token ids, for training and scoring; ``None`` for generation.
            left_pad: pad on the left, for generation.
        """
        batch_size, visual_length, _ = visual_embeds.shape
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rows, label_rows = [], []
        for index in range(batch_size):
            ids, is_visual = [], []
            for segment in order:
                if segment == "image":
                    ids += [pad] * visual_length
                    is_visual += [True] * visual_length
                else:
                    ids += prompt_ids[segment][index]
                    is_visual += [False] * len(prompt_ids[segment][index])
            labels = None
            if answer_ids is not None:
                target = answer_ids[index] + [eos]
                if self.is_encoder_decoder:
                    labels = target
                else:
                    labels = [IGNORE_INDEX] * len(ids) + target
                    ids, is_visual = ids + target, is_visual + [False] * len(target)
            rows.append((ids, is_visual))
            label_rows.append(labels)

        length = max(len(ids) for ids, _ in rows)
        device = visual_embeds.device
        input_ids = torch.full((batch_size, length), pad, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        visual_mask = torch.zeros((batch_size, length), dtype=torch.bool)
        for index, (ids, is_visual) in enumerate(rows):
            span = slice(length - len(ids), length) if left_pad else slice(0, len(ids))
            input_ids[index, span] = torch.tensor(ids)
            attention_mask[index, span] = 1
            visual_mask[index, span] = torch.tensor(is_visual)
        embeds = self.model.get_input_embeddings()(input_ids.to(device))
        embeds = embeds.masked_scatter(visual_mask.to(device).unsqueeze(-1), visual_embeds.to(embeds.dtype))

        labels = _padded_labels(label_rows, device) if answer_ids is not None else None
        return PromptBatch(embeds, attention_mask.to(device), labels)

    # ---- scoring, loss, generation ----------------------------------------------------------------
    def answer_log_likelihood(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence: the summed log-probability of the answer tokens, and how many there are."""
        if batch.labels is None:
            raise ValueError("answer_log_likelihood needs a batch built with answer_ids")
        with lm_autocast(self.autocast_mode, batch.inputs_embeds.device):
            return self._answer_log_likelihood(batch)

    def _answer_log_likelihood(self, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_encoder_decoder:
            logits = self.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                labels=batch.labels).logits
            labels = batch.labels
        else:
            labels = batch.labels[:, 1:]  # the logits at position i predict token i + 1
            if self.keeps_chosen_logits:
                positions = (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # any row's answer
                logits = self.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                    logits_to_keep=positions).logits
                labels = labels[:, positions]
            else:
                logits = self.model(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
                logits = logits[:, :-1]
        return _summed_log_probs(logits, labels)

    def score_answers(self, prompt: PromptBatch, answer_ids: Sequence[Sequence[int]],
                      num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared-prefix ranking: :meth:`answer_log_likelihood` of ``[prompt, answer]`` for every candidate, with
        each sample's prompt run once and shared by its ``num_candidates`` answers:

        - decoder-only LMs that take a 4D attention mask: one pass over ``[prompt, answer 1, …, answer C]``, each
          answer seeing the prompt and its own earlier tokens (:meth:`_score_packed`);
        - other decoder-only LMs (BioGPT; GPT-2 before transformers 4.5x): the prompt, then the answers on its
          key/value cache (:meth:`_score_on_cache`);
        - T5: the encoder once, its output reused by the decoder for every answer.

        Args:
            prompt: one left-padded prompt per sample (``build_batch(..., left_pad=True)``, no answers).
            answer_ids: the candidates' token ids, sample-major (``num_candidates`` per sample).
        Returns:
            Per candidate, sample-major: the summed log-probability of its answer tokens (eos included) and
            their count.
        """
        with lm_autocast(self.autocast_mode, prompt.inputs_embeds.device):
            return self._score_answers(prompt, answer_ids, num_candidates)

    def _score_answers(self, prompt: PromptBatch, answer_ids: Sequence[Sequence[int]],
                       num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packs_answers:
            return self._score_packed(prompt, answer_ids, num_candidates)
        labels = self._answer_labels(answer_ids, prompt.inputs_embeds.device)
        if self.is_encoder_decoder:
            encoded = self.model.get_encoder()(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask)
            hidden = encoded.last_hidden_state.repeat_interleave(num_candidates, dim=0)
            prompt_mask = prompt.attention_mask.repeat_interleave(num_candidates, dim=0)
            logits = self.model(encoder_outputs=(hidden,), attention_mask=prompt_mask, labels=labels).logits
            return _summed_log_probs(logits, labels)
        return self._score_on_cache(prompt, num_candidates, labels)

    @property
    def packs_answers(self) -> bool:
        """Whether :meth:`score_answers` runs prompt and answers in one pass: a decoder-only LM that takes
        ``position_ids`` and ``logits_to_keep``, and honours a 4D attention mask (checked once, see
        :meth:`_honours_4d_masks`)."""
        if self._packs_answers is None:
            self._packs_answers = (not self.is_encoder_decoder and self.keeps_chosen_logits
                                   and self.takes_position_ids and self._honours_4d_masks())
        return self._packs_answers

    def _honours_4d_masks(self) -> bool:
        """Pack one answer after two different ones of the same length: with the mask honoured it cannot see
        them, so its score is the same (the same arithmetic in any dtype); an LM that ignored the mask would
        let it attend to them."""
        a, b, c = self.tokenize(["a probe prompt of a few words"], max_length=8)[0][:3]
        device = self.model.get_input_embeddings().weight.device
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                embeds = self.model.get_input_embeddings()(torch.tensor([[a, b, c]], device=device))
                prompt = PromptBatch(embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=device))
                scores = [self._score_packed(prompt, answers, 2)[0][1] for answers in ([[a, b], [c]], [[c, a], [c]])]
        finally:
            self.model.train(was_training)
        if not torch.allclose(scores[0], scores[1], rtol=1e-6, atol=0.0):
            logger.warning("%s ignores a 4D attention mask: answers are scored on the prompt's key/value cache",
                           type(self.model).__name__)
            return False
        return True

    def _answer_labels(self, answer_ids: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        """Each answer's tokens and eos, padded with ``IGNORE_INDEX``."""
        return _padded_labels([list(ids) + [self.tokenizer.eos_token_id] for ids in answer_ids], device)

    def _score_packed(self, prompt: PromptBatch, answer_ids: Sequence[Sequence[int]],
                      num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass per sample over ``[prompt, answer 1, …, answer C]``, each answer in a block of ``width`` tokens
        (its eos is only a target) that sees the prompt's real tokens and its own block causally."""
        embeds, prompt_real = prompt.inputs_embeds, prompt.attention_mask.bool()
        batch_size, prompt_length, _ = embeds.shape
        device, width = embeds.device, max(1, max(len(ids) for ids in answer_ids))
        tokens = torch.full((len(answer_ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, ids in enumerate(answer_ids):
            tokens[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        answer_real = (torch.arange(width)[None, :] < torch.tensor([len(ids) for ids in answer_ids])[:, None])
        tokens = tokens.to(device).view(batch_size, num_candidates * width)
        answer_real = answer_real.to(device).view(batch_size, num_candidates * width)
        inputs = torch.cat([embeds, self.model.get_input_embeddings()(tokens).to(embeds.dtype)], dim=1)

        # positions: the prompt counts its real tokens (left padding); every answer continues from its end
        prompt_positions = (prompt.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        answer_positions = prompt_positions[:, -1:] + 1 + torch.arange(width, device=device).repeat(num_candidates)
        # who sees whom: causal, within the prompt or one answer's block, real keys only; every row sees itself
        length = prompt_length + num_candidates * width
        block = torch.cat([torch.full((prompt_length,), -1, device=device),
                           torch.arange(num_candidates, device=device).repeat_interleave(width)])
        index = torch.arange(length, device=device)
        visible = (index[None, :] <= index[:, None]) & ((block[:, None] == block[None, :]) | (block[None, :] == -1))
        visible = (visible[None] & torch.cat([prompt_real, answer_real], dim=1)[:, None, :]) | torch.eye(
            length, dtype=torch.bool, device=device)
        mask = torch.zeros((batch_size, 1, length, length), dtype=embeds.dtype, device=device)
        mask.masked_fill_(~visible[:, None], torch.finfo(embeds.dtype).min)  # the additive form 4D masks take

        logits = self.model(inputs_embeds=inputs, attention_mask=mask,
                            position_ids=torch.cat([prompt_positions, answer_positions], dim=1),
                            logits_to_keep=num_candidates * width + 1).logits
        # the prompt's last logits predict each answer's first token, answer token i's predict token i + 1
        vocabulary = logits.shape[-1]
        first = logits[:, :1].expand(-1, num_candidates, -1).reshape(-1, 1, vocabulary)
        rest = logits[:, 1:].reshape(-1, width, vocabulary)
        labels = self._answer_labels(answer_ids, device)
        return _summed_log_probs(torch.cat([first, rest], dim=1)[:, : labels.shape[1]], labels)

    def _score_on_cache(self, prompt: PromptBatch, num_candidates: int,
                        labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt once, then every answer on its key/value cache."""
        positions = (prompt.attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: count real tokens
        keep_last = {"logits_to_keep": 1} if self.keeps_chosen_logits else {}
        first = self.model(inputs_embeds=prompt.inputs_embeds, attention_mask=prompt.attention_mask,
                           use_cache=True, **self._positions(positions), **keep_last)
        cache = _repeat_cache(first.past_key_values, num_candidates)
        prompt_mask = prompt.attention_mask.repeat_interleave(num_candidates, dim=0)
        answer_mask = (labels != IGNORE_INDEX).long()
        answer_positions = positions[:, -1:].repeat_interleave(num_candidates, dim=0) + 1 + torch.arange(
            labels.shape[1], device=labels.device)
        rest = self.model(input_ids=labels.masked_fill(labels == IGNORE_INDEX, self.tokenizer.pad_token_id),
                          attention_mask=torch.cat([prompt_mask, answer_mask], dim=1), past_key_values=cache,
                          use_cache=True, **self._positions(answer_positions)).logits
        # the prompt's last logits predict the first answer token, answer token i's predict token i + 1
        logits = torch.cat([first.logits[:, -1:].repeat_interleave(num_candidates, dim=0), rest[:, :-1]], dim=1)
        return _summed_log_probs(logits, labels)

    def _positions(self, position_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """``position_ids`` for LMs that take them (others, e.g. BioGPT, count positions from the mask)."""
        return {"position_ids": position_ids} if self.takes_position_ids else {}

    def loss(self, batch: PromptBatch) -> torch.Tensor:
        """Mean negative log-likelihood over all answer tokens of the batch."""
        total, count = self.answer_log_likelihood(batch)
        return -total.sum() / count.sum().clamp(min=1)

    def generate(self, batch: PromptBatch, **generate_kwargs: Any) -> list[str]:
        """Decode answers for a (left-padded, label-free) prompt batch."""
        with lm_autocast(self.autocast_mode, batch.inputs_embeds.device):
            output_ids = self.model.generate(
                inputs_embeds=batch.inputs_embeds,
                attention_mask=batch.attention_mask,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **generate_kwargs,
            )
        return [text.strip() for text in self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)]


def _padded_labels(rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """Label rows of different lengths as one (N, longest) tensor, padded with ``IGNORE_INDEX``."""
    labels = torch.full((len(rows), max(map(len, rows))), IGNORE_INDEX, dtype=torch.long)
    for index, row in enumerate(rows):
        labels[index, : len(row)] = torch.tensor(row)
    return labels.to(device)


def _summed_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of its labelled tokens, and how many there are."""
    valid = labels != IGNORE_INDEX
    token_log_probs = -F.cross_entropy(logits.float().transpose(1, 2), labels.masked_fill(~valid, 0), reduction="none")
    return (token_log_probs * valid).sum(dim=1), valid.sum(dim=1)


def _repeat_cache(cache: Any, repeats: int) -> Any:
    """Each sample's key/value cache ``repeats`` times (sample-major), as a ``Cache`` or legacy tuples."""
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(repeats)
        return cache
    return tuple(tuple(tensor.repeat_interleave(repeats, dim=0) for tensor in layer) for layer in cache)


def _add_lora(model: nn.Module, lora: LoRAConfig) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    family = model.config.model_type
    targets = lora.target_modules or DEFAULT_TARGETS.get(family)
    if not targets:
        raise ValueError(
            f"no default LoRA target modules for LM family {family!r}; set model.lm.lora.target_modules "
            f"(e.g. the attention query/value projection names)"
        )
    # GPT-2-style Conv1D layers store weights transposed
    fan_in_fan_out = any(isinstance(module, Conv1D) for name, module in model.named_modules()
                         if name.split(".")[-1] in targets)
    task = TaskType.SEQ_2_SEQ_LM if model.config.is_encoder_decoder else TaskType.CAUSAL_LM
    config = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=list(targets), task_type=task, fan_in_fan_out=fan_in_fan_out)
    peft_model = get_peft_model(model, config)
    logger.info("LoRA on %s %s: r=%d alpha=%d dropout=%.2f", family, targets, lora.r, lora.alpha, lora.dropout)
    return peft_model
