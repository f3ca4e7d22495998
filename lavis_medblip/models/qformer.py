"""The MedQFormer: LAVIS's BLIP-2 Q-Former (a BERT with cross-attention to the ViT tokens, plus learned
queries), built from ``model.qformer`` with a configurable BERT source and size.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from transformers import BertTokenizer

from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel

from lavis_medblip.models.config import QFormerConfig
from lavis_medblip.models.weights import from_pretrained_or_explain

BERT_KEY = "qformer.bert"  # the YAML key a failed BERT load names


def build_qformer(config: QFormerConfig, vision_width: int) -> tuple[BertLMHeadModel, nn.Parameter, BertTokenizer]:
    """The Q-Former over ViT tokens ``vision_width`` wide, its query tokens and its BERT tokenizer.

    As LAVIS's ``Blip2Qformer``: the tokenizer gains ``[DEC]`` (its embedding starts random) and the
    queries' feed-forward layers start from BERT's. The ITG head is dropped: in MedBLIP the LM speaks.
    """
    tokenizer = from_pretrained_or_explain(BertTokenizer.from_pretrained, BERT_KEY, config.bert)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if config.load_bert_weights:
        bert_config = from_pretrained_or_explain(BertConfig.from_pretrained, BERT_KEY, config.bert)
    elif os.path.isfile(os.path.join(config.bert, "config.json")):
        bert_config = BertConfig.from_pretrained(config.bert)
    else:
        bert_config = BertConfig()
    for key, value in dict(config.config_overrides or {}).items():
        setattr(bert_config, key, value)
    bert_config.encoder_width = vision_width
    bert_config.add_cross_attention = True
    bert_config.cross_attention_freq = config.cross_attention_freq
    bert_config.query_length = config.num_queries
    if config.load_bert_weights:
        qformer = from_pretrained_or_explain(BertLMHeadModel.from_pretrained, BERT_KEY, config.bert, config=bert_config)
    else:
        qformer = BertLMHeadModel(bert_config)
    query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, bert_config.hidden_size))
    query_tokens.data.normal_(mean=0.0, std=bert_config.initializer_range)

    qformer.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # [DEC] starts random, as in LAVIS
    if config.load_bert_weights:
        copy_text_ffn_to_query_ffn(qformer)
    qformer.cls = None
    return qformer, query_tokens, tokenizer


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
