"""MedBLIP's model config: one typed section per part (``vision``, ``qformer``, ``lm`` with ``lora``,
``loss``), each the single home of its defaults, and the composition of a model type's YAML.
"""
import dataclasses
import io
import logging
import os
from collections import UserString
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from lavis_medblip.annotations.ehr import DIAGNOSIS_QUESTION

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
BASE_CONFIG_FILE = CONFIG_DIR / "medblip_base.yaml"
#: What a pretraining row without an answer trains (model.loss.unlabelled_rows; models/losses.py applies it).
UNLABELLED_ROWS = ("itc_text_only", "empty_answer")
MODEL_TYPES = ("biomedlm", "biomedlm_lora", "biogpt", "biogpt_lora", "flant5xl", "flant5xl_lora", "tiny", "demo")

PROMPT_SEGMENTS = ("image", "text", "question")
#: The segments of a text-only prompt: the LM alone, with no visual prefix (the paper's Table 2 "Text only").
TEXT_ONLY_SEGMENTS = ("text", "question")
VIT_PRECISIONS = ("fp16", "fp32")
LM_DTYPES = ("float32", "float16", "bfloat16")
#: model.lm.autocast: the LM's forward in bf16 always, or only where the hardware multiplies bf16 natively.
LM_AUTOCAST = ("bfloat16", "bfloat16_if_native")
#: Architectures of the 2D encoders the 3D stem can feed, by LAVIS's ``vit_model`` name.
VIT_PRESETS: dict[str, dict[str, Any]] = {
    # LAVIS's create_eva_vit_g: EVA-CLIP ViT-g/14 with its last block removed (39 of 40).
    "eva_clip_g": dict(embed_dim=1408, depth=39, num_heads=16, mlp_ratio=4.3637, qkv_bias=True),
}


def _check_positive(key: str, **values: int | float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{key}.{name} must be positive (got {value})")


def _check_divisible(key: str, config: Mapping[str, Any], width: str, heads: str) -> None:
    if width in config and heads in config and config[width] % config[heads]:
        raise ValueError(f"{key}: {width} must be divisible by {heads} (got {config[width]} and {config[heads]})")


@dataclass
class VisionConfig:
    """The vision path: a trainable 3D patch stem in front of a pretrained 2D ViT's blocks (paper §3.3)."""

    KEY: ClassVar[str] = "model.vision"

    model: str = field(default="eva_clip_g", metadata={
        "help": f"the 2D ViT whose blocks run the 3D tokens, one of {sorted(VIT_PRESETS)}"})
    arch: dict[str, Any] | None = field(default=None, metadata={
        "help": "overrides of the preset's embed_dim, depth, num_heads, mlp_ratio (tiny CPU configurations)"})
    weights: str | None = field(default=None, metadata={
        "help": "URL or file of the 2D ViT's weights (LAVIS's key layout; its 2D stem is not loaded); null: random"})
    precision: str = field(default="fp16", metadata={
        "help": f"of the ViT blocks, one of {list(VIT_PRECISIONS)}; the 3D stem stays fp32"})
    grad_checkpoint: bool = field(default=False, metadata={"help": "gradient checkpointing of the ViT blocks"})
    patch_size: int = field(default=32, metadata={"help": "edge of a 3D patch in voxels (the paper: 32 on 224³)"})
    patch_stride: int | None = field(default=None, metadata={
        "help": "step between 3D patches in voxels; null: the patch size (non-overlapping patches)"})
    train_cls_token: bool = field(default=False, metadata={
        "help": "train the ViT's CLS token with the 3D stem while the blocks are frozen; false: the paper's "
                "(§3.3 trains only the patch projection and position embedding). With freeze_vit: false it trains"})

    def __post_init__(self) -> None:
        if self.model not in VIT_PRESETS:
            raise ValueError(f"{self.KEY}.model {self.model!r} has no 3D stem. Available: {sorted(VIT_PRESETS)}")
        if self.precision not in VIT_PRECISIONS:
            raise ValueError(f"{self.KEY}.precision must be one of {list(VIT_PRECISIONS)} (got {self.precision!r})")
        _check_positive(self.KEY, patch_size=self.patch_size, patch_stride=self.patch_stride or self.patch_size)
        _check_divisible(f"{self.KEY}.arch", {**VIT_PRESETS[self.model], **(self.arch or {})}, "embed_dim", "num_heads")


@dataclass
class QFormerConfig:
    """The MedQFormer: LAVIS's BLIP-2 Q-Former on a BERT, with learned queries and ITC projections."""

    KEY: ClassVar[str] = "model.qformer"

    bert: str = field(default="bert-base-uncased", metadata={
        "help": "hub name or folder of the BERT it starts from (config, vocabulary and, if loaded, weights)"})
    load_bert_weights: bool = field(default=True, metadata={
        "help": "start from the BERT's weights; false: its architecture (or BERT-base's) with random weights"})
    config_overrides: dict[str, Any] | None = field(default=None, metadata={
        "help": "BertConfig attributes to change, e.g. hidden_size, num_hidden_layers, dropout probabilities"})
    num_queries: int = field(default=32, metadata={"help": "learned query tokens, the visual prefix's length"})
    cross_attention_freq: int = field(default=2, metadata={
        "help": "cross-attention to the ViT tokens in every n-th layer"})
    embed_dim: int = field(default=256, metadata={"help": "width of the ITC projections (vision_proj, text_proj)"})
    max_text_len: int = field(default=256, metadata={"help": "token limit of the texts of the ITC text branch"})

    def __post_init__(self) -> None:
        _check_positive(self.KEY, num_queries=self.num_queries, cross_attention_freq=self.cross_attention_freq,
                        embed_dim=self.embed_dim, max_text_len=self.max_text_len)
        _check_divisible(f"{self.KEY}.config_overrides", self.config_overrides or {},
                         "hidden_size", "num_attention_heads")


@dataclass
class LoRAConfig:
    """LoRA on the frozen LM's attention projections (paper §3.4), as peft's ``LoraConfig``."""

    KEY: ClassVar[str] = "model.lm.lora"

    enabled: bool = field(default=False, metadata={"help": "add LoRA; false: the LM is frozen (Table 2's 'Frozen')"})
    r: int = field(default=8, metadata={"help": "rank of the LoRA update"})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "dropout on the LoRA branch's input"})
    target_modules: list[str] | None = field(default=None, metadata={
        "help": "module names to adapt; null: peft's default for the LM family (q/v projections; GPT-2's c_attn)"})

    def __post_init__(self) -> None:
        _check_positive(self.KEY, r=self.r, alpha=self.alpha)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"{self.KEY}.dropout must be in [0, 1) (got {self.dropout})")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError(f"{self.KEY}.target_modules must name modules or be null (got [])")


@dataclass
class LanguageModelConfig:
    """The frozen Hugging Face LM that reads the prompt and speaks the answer."""

    KEY: ClassVar[str] = "model.lm"

    model: str | None = field(default=None, metadata={"help": "hub name or folder of the LM (decoder-only or T5)"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "hub name or folder of its tokenizer; null: lm.model's"})
    tokenizer_kwargs: dict[str, Any] | None = field(default=None, metadata={
        "help": "keyword arguments of the tokenizer's from_pretrained, e.g. eos_token"})
    config_overrides: dict[str, Any] | None = field(default=None, metadata={
        "help": "build a random LM of this architecture (AutoConfig.for_model; needs model_type), not lm.model"})
    gguf_file: str | None = field(default=None, metadata={"help": "a GGUF file inside lm.model's folder to read"})
    num_layers: int | None = field(default=None, metadata={
        "help": "keep only the LM's first N transformer blocks (a cheaper LM for CPU runs); null: all of them"})
    dtype: str = field(default="float32", metadata={"help": f"of the LM's weights, one of {list(LM_DTYPES)}"})
    autocast: str | None = field(default=None, metadata={
        "help": "run the LM's forward under torch.autocast: null, off (weights and arithmetic in lm.dtype); "
                "bfloat16; bfloat16_if_native, bf16 on a GPU that supports it or a CPU with AVX512-BF16 or AMX, "
                "else off (other CPUs emulate bf16, slower than fp32). The weights stay in lm.dtype"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "the LM's attention kernel, transformers' attn_implementation (eager, sdpa, ...); null: "
                "transformers' default"})
    trust_remote_code: bool = field(default=False, metadata={"help": "let the hub LM run its own modelling code"})
    lora: LoRAConfig = field(default_factory=LoRAConfig, metadata={"help": "LoRA on the LM (model.lm.lora)"})

    def __post_init__(self) -> None:
        if self.dtype not in LM_DTYPES:
            raise ValueError(f"{self.KEY}.dtype must be one of {list(LM_DTYPES)} (got {self.dtype!r})")
        if self.autocast is not None and self.autocast not in LM_AUTOCAST:
            raise ValueError(f"{self.KEY}.autocast must be null or one of {list(LM_AUTOCAST)} (got {self.autocast!r})")
        if self.num_layers is not None:
            _check_positive(self.KEY, num_layers=self.num_layers)
        if self.config_overrides is not None and "model_type" not in self.config_overrides:
            raise ValueError(f"{self.KEY}.config_overrides needs a model_type, e.g. gpt2 "
                             f"(got keys {sorted(self.config_overrides)})")


@dataclass
class LossConfig:
    """The pretraining loss ``λ_T·loss_itc_text + λ_QA·loss_itc_qa + λ_LG·loss_lm`` (paper eq. 4–5: λ_T = λ_QA = 1).

    A weight of 0 drops its term: it is neither computed nor logged (the paper's Table 6 ablation).
    """

    KEY: ClassVar[str] = "model.loss"

    lambda_lm: float = field(default=1.0, metadata={
        "help": "weight of the LM loss (λ_LG); 0 is an LM-free Q-Former stage that skips the LM"})
    lambda_itc_text: float = field(default=1.0, metadata={
        "help": "weight of ITC(image, EHR text); 0 drops the term (Table 6)"})
    lambda_itc_qa: float = field(default=1.0, metadata={
        "help": "weight of ITC(image, question + answer); 0 drops the term (Table 6)"})
    unlabelled_rows: str = field(default="itc_text_only", metadata={
        "help": f"what a row without an answer (OASIS-1: no diagnosis) trains, one of {list(UNLABELLED_ROWS)}: "
                "itc_text_only, only ITC(image, EHR text) (no LM, no ITC(image, Q&A) term); empty_answer, every "
                "term with an empty answer (before this key)"})

    def __post_init__(self) -> None:
        for name in ("lambda_lm", "lambda_itc_text", "lambda_itc_qa"):
            if getattr(self, name) < 0:
                raise ValueError(f"{self.KEY}.{name} must not be negative (got {getattr(self, name)})")
        if self.unlabelled_rows not in UNLABELLED_ROWS:
            raise ValueError(f"{self.KEY}.unlabelled_rows must be one of {list(UNLABELLED_ROWS)} "
                             f"(got {self.unlabelled_rows!r})")
        if self.lambda_lm == self.lambda_itc_text == self.lambda_itc_qa == 0:
            raise ValueError(f"{self.KEY}: every loss weight is 0, nothing would train")


@dataclass
class MedBLIPConfig:
    """The whole model: its parts' sections, and the settings that concern more than one part.

    ``model:`` in a YAML has the sections ``vision`` (3D stem + 2D ViT), ``qformer``, ``lm`` (with
    ``lora``) and ``loss``, and at the top what belongs to the whole model (what it is, its input size,
    which weights it starts from, what trains in a stage, the prompt). Configs written before the
    sections existed, with flat keys (``lm_model``, ``vit_weights``…), are read through
    :func:`nest_flat_keys`.

    Defaults are the paper's model (224³ input, patch 32, EVA-CLIP ViT-g, 32 queries, λ_LG = 1)
    with random weights and no LM named.
    """

    KEY: ClassVar[str] = "model"

    arch: str = field(default="medblip", metadata={"help": "LAVIS registry name"})
    model_type: str = field(default="", metadata={
        "help": "the model type (configs/medblip_<type>.yaml) it was read from"})
    image_size: int = field(default=224, metadata={
        "help": "edge of the input volume in voxels: the mri_volume_* processors produce it, the 3D stem is "
                "built for it"})
    init_seed: int = field(default=0, metadata={
        "help": "seeds the parts without pretrained weights, independently of run.seed, so that a checkpoint of "
                "trainable parameters always fits the same frozen backbones"})
    qformer_pretrained: str | None = field(default=None, metadata={
        "help": "URL or file of a BLIP-2 checkpoint (Q-Former, queries, ITC projections, ln_vision); null: none"})
    load_finetuned: bool = field(default=False, metadata={"help": "load the finetuned checkpoint after building"})
    finetuned: str | None = field(default=None, metadata={
        "help": "a checkpoint of trainable parameters (ours or a LAVIS runner's); empty or null: none"})
    # What trains in a stage: the model applies these to the built parts, and a stage flips them.
    freeze_vit: bool = field(default=True, metadata={
        "help": "freeze the 2D ViT blocks, kept in eval mode (BLIP-2's freeze_vit); false needs vision.precision "
                "fp32"})
    freeze_vision_stem: bool = field(default=False, metadata={
        "help": "freeze the whole vision path, the 3D stem too (the paper trains the stem)"})
    freeze_qformer_bert: bool = field(default=False, metadata={
        "help": "freeze the Q-Former's BERT weights: only what the Q-Former adds (cross-attention, query FFN) "
                "trains"})
    vision_feature_cache: str | None = field(default=None, metadata={
        "help": "folder caching the frozen vision encoder's tokens per volume; needs freeze_vision_stem"})
    # The prompt (paper eq. 2)
    prompt_order: list[str] = field(default_factory=lambda: list(PROMPT_SEGMENTS), metadata={
        "help": f"order of the prompt's segments, a permutation of {list(PROMPT_SEGMENTS)}; without "
                f"'image' ({list(TEXT_ONLY_SEGMENTS)} in some order) the LM reads the text alone, with no visual "
                f"prefix (Table 2's text-only baseline)"})
    question: str = field(default=DIAGNOSIS_QUESTION, metadata={"help": "the question asked when a sample has none"})
    max_prompt_len: int = field(default=256, metadata={"help": "LM token limit of the EHR text and of the question"})
    max_answer_len: int = field(default=32, metadata={"help": "LM token limit of an answer"})

    vision: VisionConfig = field(default_factory=VisionConfig, metadata={"help": "the vision path (model.vision)"})
    qformer: QFormerConfig = field(default_factory=QFormerConfig, metadata={"help": "the Q-Former (model.qformer)"})
    lm: LanguageModelConfig = field(default_factory=LanguageModelConfig, metadata={"help": "the LM (model.lm)"})
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "the loss (model.loss)"})

    def __post_init__(self) -> None:
        # The stride as built, so that a saved config states it (not in VisionConfig: OmegaConf builds a
        # section's defaults, running its checks, before merging the values that replace them)
        self.vision.patch_stride = self.vision.patch_stride or self.vision.patch_size
        self.finetuned = self.finetuned or None  # LAVIS's YAMLs write "" for none
        if sorted(self.prompt_order) not in (sorted(PROMPT_SEGMENTS), sorted(TEXT_ONLY_SEGMENTS)):
            raise ValueError(f"model.prompt_order must order {list(PROMPT_SEGMENTS)}, or {list(TEXT_ONLY_SEGMENTS)} "
                             f"for the text-only LM (got {list(self.prompt_order)})")
        if not self.uses_image and self.loss.lambda_lm == 0:
            raise ValueError("model.prompt_order without 'image' is the LM alone: it needs model.loss.lambda_lm > 0")
        _check_positive(self.KEY, image_size=self.image_size, max_prompt_len=self.max_prompt_len,
                        max_answer_len=self.max_answer_len)
        if self.vision.patch_size > self.image_size:
            raise ValueError(f"model.vision.patch_size must not exceed model.image_size "
                             f"(got {self.vision.patch_size} and {self.image_size})")
        if not self.freeze_vit and self.vision.precision != "fp32":
            raise ValueError(f"model.freeze_vit: false needs model.vision.precision: fp32 "
                             f"(got {self.vision.precision!r})")
        if self.vision_feature_cache and not self.freeze_vision_stem:
            raise ValueError(
                f"model.vision_feature_cache is set ({self.vision_feature_cache}) but model.freeze_vision_stem is "
                f"false: cached ViT outputs would go stale as the 3D stem trains. Set freeze_vision_stem: true "
                f"(e.g. a second stage training only the Q-Former and LoRA) or vision_feature_cache: null."
            )

    @property
    def uses_image(self) -> bool:
        """False for the text-only LM: no vision path, no Q-Former, no ITC."""
        return "image" in self.prompt_order

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "MedBLIPConfig":
        """Read a ``model:`` section, nested or with flat keys (translated, with a warning).

        Interpolations are resolved; an unknown key, a value of the wrong type or an invalid
        combination is a ``ValueError`` naming the key.
        """
        if OmegaConf.is_config(values):
            values = OmegaConf.to_container(values, resolve=True)
        try:
            return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), nest_flat_keys(values)))
        except OmegaConfBaseException as error:
            message = f"model.{error.full_key}: {str(error.msg).splitlines()[0]}"  # without OmegaConf's key dump
            if isinstance(error, ConfigKeyError) and dataclasses.is_dataclass(error.object_type):
                message += f" (known keys: {sorted(f.name for f in dataclasses.fields(error.object_type))})"
            raise ValueError(message) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested containers (what a checkpoint records)."""
        return dataclasses.asdict(self)


#: The flat keys of configs written before the sections existed, and where each lives now.
FLAT_KEY_PATHS: dict[str, str] = {
    "vit_model": "vision.model",
    "vit_arch": "vision.arch",
    "vit_weights": "vision.weights",
    "vit_precision": "vision.precision",
    "vit_grad_checkpoint": "vision.grad_checkpoint",
    "patch_size": "vision.patch_size",
    "patch_stride": "vision.patch_stride",
    "qformer_bert": "qformer.bert",
    "qformer_load_bert_weights": "qformer.load_bert_weights",
    "qformer_config_overrides": "qformer.config_overrides",
    "num_query_token": "qformer.num_queries",
    "cross_attention_freq": "qformer.cross_attention_freq",
    "embed_dim": "qformer.embed_dim",
    "max_text_len": "qformer.max_text_len",
    "lm_model": "lm.model",
    "lm_tokenizer": "lm.tokenizer",
    "lm_tokenizer_kwargs": "lm.tokenizer_kwargs",
    "lm_config_overrides": "lm.config_overrides",
    "lm_gguf_file": "lm.gguf_file",
    "lm_dtype": "lm.dtype",
    "trust_remote_code": "lm.trust_remote_code",
    "lora": "lm.lora",
    "lambda_lm": "loss.lambda_lm",
}


def nest_flat_keys(values: Mapping[str, Any]) -> dict[str, Any]:
    """The one translation of flat keys (:data:`FLAT_KEY_PATHS`) to their sections; logs the new names.

    A flat key wins over the nested one: in a merged config it can only come from the user (a
    project file, ``--options model.lm_model=…`` or an old checkpoint), the nested one from the
    defaults. A mapping merges into the section's mapping, as LAVIS merges configs
    (``--options model.lora.r=4`` keeps ``lm.lora.enabled``).
    """
    flat = [key for key in FLAT_KEY_PATHS if key in values]
    nested = OmegaConf.create({key: value for key, value in values.items() if key not in FLAT_KEY_PATHS})
    for key in flat:
        OmegaConf.update(nested, FLAT_KEY_PATHS[key], values[key], merge=True)
    if flat:
        logger.warning("Flat model config keys are deprecated; use the nested ones: %s",
                       ", ".join(f"model.{key} → model.{FLAT_KEY_PATHS[key]}" for key in flat))
    return OmegaConf.to_container(nested)


# ---- model-type YAMLs -------------------------------------------------------------------------------


def model_type_file(model_type: str) -> Path:
    """``configs/medblip_<model_type>.yaml``: what that model type changes in ``medblip_base.yaml``."""
    return CONFIG_DIR / f"medblip_{model_type}.yaml"


def compose_model_config(type_file: str | os.PathLike) -> DictConfig:
    """The whole config of a model type: the defaults, then ``medblip_base.yaml``, then ``type_file``.

    A model type's YAML holds only what differs from ``medblip_base.yaml``, which holds only what
    differs from the defaults of :class:`MedBLIPConfig`.

    Interpolations (``${medblip_pretrained:…}``) are kept, to be resolved when read.
    """
    defaults = OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.structured(MedBLIPConfig))})
    return OmegaConf.merge(defaults, OmegaConf.load(BASE_CONFIG_FILE), OmegaConf.load(type_file))


def load_model_config(model_type: str) -> DictConfig:
    """A model type's whole config (``model`` and ``preprocess``), as LAVIS's loaders read it."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown medblip model type {model_type!r}. Available: {list(MODEL_TYPES)}")
    return compose_model_config(model_type_file(model_type))


class ComposedConfigPath(UserString):
    """A model type's YAML path that reads as its whole config (:func:`compose_model_config`).

    LAVIS hands ``default_config_path`` to ``OmegaConf.load``, which reads any object with
    ``read()``: as a string this is the model type's file, read it is the composition, so LAVIS's
    ``load_model``, ``load_model_and_preprocess`` and ``Config`` see every setting while the file
    holds only what differs. Every load reads it anew.
    """

    _stream: io.StringIO | None = None

    @property
    def name(self) -> str:  # PyYAML names its stream in error messages
        return self.data

    def read(self, size: int = -1) -> str:
        if self._stream is None:
            self._stream = io.StringIO(OmegaConf.to_yaml(compose_model_config(self.data)))
        chunk = self._stream.read(size)
        if not chunk:  # the end of one load; the next starts over
            self._stream = None
        return chunk
