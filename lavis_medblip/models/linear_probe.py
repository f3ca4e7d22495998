"""``medblip_linear_probe``: the paper's Table 4, a linear classification head with cross-entropy on MedBLIP's
visual features (§4.2 ablation 1).

- ``probe.features: queries`` (the "Our MedQFormer" row): the MedQFormer's query outputs, mean-pooled over the
  queries, from a pretrained MedBLIP (``model.finetuned``). Only the head trains.
- ``probe.features: vit`` (the "ViT-G" row): the ViT's output tokens (after ``ln_vision``), mean-pooled. With
  ``freeze_vit: false`` the whole vision path trains with the head ("trainable ViT-G from the initial weight of
  EVA-CLIP"); with it true only the head trains.

The rest of the ``model:`` section is a MedBLIP's (``model_type`` picks one of its types). Only its vision path
and Q-Former are built (no LM is loaded), and only their weights are read from a MedBLIP checkpoint. Evaluation goes through
``medblip_classification`` in ``rank`` mode: :meth:`predict_answers` scores the class answers by the head's
log-probabilities.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F
from transformers.utils import ModelOutput

from lavis.common.registry import registry
from lavis.models.base_model import BaseModel

from lavis_medblip.annotations.schema import CLASS_ANSWERS, CLASS_NAMES
from lavis_medblip.models.calibration import Calibration
from lavis_medblip.models.config import MedBLIPConfig
from lavis_medblip.models.medblip import CandidateRanking, MedBLIP
from lavis_medblip.models.qformer import build_qformer
from lavis_medblip.models.vision_3d import build_vision_encoder
from lavis_medblip.models.weights import check_fits, read_checkpoint, read_state_dict, state_dict_of

logger = logging.getLogger(__name__)
PROBE_FEATURES = ("queries", "vit")
#: The parts of a MedBLIP checkpoint the probe reads (its LoRA and LM projection are not built here).
FEATURE_PREFIXES = ("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens")


class NoLanguageModel(nn.Module):
    """Stands in for MedBLIP's LM, which the probe never runs: ``hidden_size`` sizes the (unused) ``llm_proj``."""

    hidden_size = 1
    is_encoder_decoder = False


@dataclass
class ProbeConfig:
    """``model.probe``: which features the head reads and which classes it predicts."""

    features: str = field(default="queries", metadata={"help": f"one of {list(PROBE_FEATURES)}"})
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES), metadata={
        "help": "the head's classes in the datasets' label order (their class_names)"})
    checkpoint: str | None = field(default=None, metadata={
        "help": "a trained probe's checkpoint (head, and the vision path if it trained) to evaluate; null: none"})

    def __post_init__(self) -> None:
        if self.features not in PROBE_FEATURES:
            raise ValueError(f"model.probe.features must be one of {list(PROBE_FEATURES)} (got {self.features!r})")
        unknown = [name for name in self.class_names if name not in CLASS_ANSWERS]
        if unknown:
            raise ValueError(f"model.probe.class_names {unknown} are not among {list(CLASS_ANSWERS)}")


@dataclass
class ProbeOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@registry.register_model("medblip_linear_probe")
class MedBLIPLinearProbe(BaseModel):
    """A frozen MedBLIP's pooled query outputs (or ViT tokens) → ``nn.Linear`` → class logits."""

    PRETRAINED_MODEL_CONFIG_DICT = MedBLIP.PRETRAINED_MODEL_CONFIG_DICT  # the MedBLIP types it reads features of

    def __init__(self, backbone: MedBLIP, probe: ProbeConfig):
        super().__init__()
        self.backbone, self.probe = backbone, probe
        self.trains_vision = probe.features == "vit" and not backbone.config.freeze_vit
        for name, parameter in backbone.named_parameters():
            parameter.requires_grad = self.trains_vision and name.startswith(("visual_encoder.", "ln_vision."))
        width = backbone.visual_encoder.num_features if probe.features == "vit" else backbone.Qformer.config.hidden_size
        self.head = nn.Linear(width, len(probe.class_names))
        self.class_answers = [CLASS_ANSWERS[name] for name in probe.class_names]
        self.calibration = Calibration()

    @classmethod
    def default_config_path(cls, model_type: str) -> Any:
        return MedBLIP.default_config_path(model_type)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "MedBLIPLinearProbe":
        values = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        probe = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ProbeConfig), values.pop("probe", {}) or {}))
        config = MedBLIPConfig.from_dict({**values, "arch": "medblip"})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)  # the same random parts as the MedBLIP of this config
            vision = build_vision_encoder(config.vision, config.image_size)
            backbone = MedBLIP(config, vision, *build_qformer(config.qformer, vision.num_features), NoLanguageModel())
            model = cls(backbone, probe)
        if config.qformer_pretrained:
            backbone.load_from_pretrained(config.qformer_pretrained)
        if config.load_finetuned and config.finetuned:
            model.load_features(config.finetuned)
        if probe.checkpoint:
            model.load_checkpoint(probe.checkpoint)
        return model

    def train(self, mode: bool = True) -> "MedBLIPLinearProbe":
        super().train(mode)
        if not self.trains_vision:  # frozen features: no dropout in the backbone
            self.backbone.eval()
        return self

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, width) of the volumes."""
        with torch.set_grad_enabled(self.trains_vision and torch.is_grad_enabled()):
            tokens = self.backbone.encode_image(image).float()
            if self.probe.features == "queries":
                tokens = self.backbone.encode_queries(tokens)
        return tokens.mean(dim=1)

    def forward(self, samples: Mapping[str, Any]) -> ProbeOutput:
        """Cross-entropy of the head's logits against ``label`` (rows labelled -1, without a diagnosis, ignored)."""
        logits = self.head(self.features(samples["image"]))
        labels = samples["label"].to(logits.device)
        if (labels >= 0).any():
            loss = F.cross_entropy(logits, labels, ignore_index=-1)
        else:
            loss = logits.sum() * 0.0
        return ProbeOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def predict_answers(self, samples: Mapping[str, Any], candidates: Sequence[str], **kwargs: Any) -> CandidateRanking:
        """The head's log-probabilities of the candidate class answers (B, C), as MedBLIP's ranking."""
        if not candidates or not isinstance(candidates[0], str):
            raise ValueError("a linear probe ranks one list of class answers for the whole batch")
        unknown = [answer for answer in candidates if answer not in self.class_answers]
        if unknown:
            raise ValueError(f"the probe has no class for the answers {unknown} (its classes: {self.class_answers})")
        log_probs = self.head(self.features(samples["image"])).log_softmax(dim=1)
        scores = log_probs[:, [self.class_answers.index(answer) for answer in candidates]]
        per_sample = [list(candidates)] * scores.shape[0]
        logits = self.calibration.logits(scores, per_sample)
        best = logits.argmax(dim=1).tolist()
        return CandidateRanking(scores, logits.softmax(dim=1), [candidates[i] for i in best])

    def generate(self, samples: Mapping[str, Any], **kwargs: Any) -> list[str]:
        raise NotImplementedError("a linear probe has no LM: evaluate it with run.classification_mode: rank")

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained parameters: the head, and the vision path when it trains."""
        return {name: p.detach().cpu() for name, p in self.named_parameters() if p.requires_grad}

    def load_features(self, url_or_filename: str) -> None:
        """The vision path and Q-Former of a MedBLIP checkpoint (``model.finetuned``), the rest left out."""
        state_dict = {key: value for key, value in read_state_dict(url_or_filename, key="finetuned").items()
                      if key.startswith(FEATURE_PREFIXES)}
        check_fits(url_or_filename, state_dict, self.backbone.state_dict(), this_model="MedBLIP feature extractor")
        self.backbone.load_state_dict(state_dict, strict=False)
        logger.info("Loaded %d MedBLIP feature tensors from %s", len(state_dict), url_or_filename)

    def load_checkpoint(self, url_or_filename: str) -> None:
        """A probe checkpoint (ours or the runner's); its keys must all be this probe's trained parameters."""
        checkpoint = read_checkpoint(url_or_filename, key="probe.checkpoint")
        state_dict = state_dict_of(checkpoint, url_or_filename)
        trainable = set(self.checkpoint_state_dict())
        check_fits(url_or_filename, checkpoint, {k: v for k, v in self.state_dict().items() if k in trainable},
                   required=trainable, this_model="medblip_linear_probe")
        self.calibration = Calibration.from_checkpoint(checkpoint, url_or_filename)
        self.load_state_dict(state_dict, strict=False)
        logger.info("Loaded %d probe tensors from %s", len(state_dict), url_or_filename)
