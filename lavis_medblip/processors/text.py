"""Registered LAVIS text processor for EHR / report text."""
from __future__ import annotations

from typing import Any, Mapping, Optional

from lavis.common.registry import registry
from lavis.processors.base_processor import BaseProcessor
from omegaconf import OmegaConf

from lavis_medblip.annotations.ehr import add_score_stages


@registry.register_processor("medblip_text")
class MedBlipTextProcessor(BaseProcessor):
    """Collapse whitespace, strip, note each MMSE / CDR value's stage, and keep at most ``max_words`` words.

    Unlike LAVIS's ``blip_caption`` it neither lowercases nor removes punctuation: clinical
    text such as "MMSE 24, CDR 0.5." carries meaning in its digits, decimals and case.

    Args:
        max_words: words kept (after the stage notes); ``None`` keeps everything.
        score_stages: write each MMSE and global CDR value's stage after it, as the cohort builders' sentences do
            (``annotations.ehr.add_score_stages``): "MMSE: 24" → "MMSE: 24 (6 points below the maximum, mild
            dementia range)". Models trained on those sentences read the stage words, not the digits, so EHR text
            in other words needs them too; the builders' sentences are left as they are.
    """

    def __init__(self, max_words: Optional[int] = 256, score_stages: bool = True) -> None:
        super().__init__()
        if max_words is not None and int(max_words) < 1:
            raise ValueError(f"max_words must be a positive integer or None, got {max_words!r}")
        self.max_words = None if max_words is None else int(max_words)
        if not isinstance(score_stages, bool):  # the string "false" would be truthy
            raise TypeError(f"score_stages must be true or false, got {score_stages!r}")
        self.score_stages = score_stages

    def __call__(self, text: str) -> str:
        if not isinstance(text, str):
            # A NaN from a pandas column or a None must not silently become the word "nan".
            raise TypeError(f"medblip_text expects a str, got {type(text).__name__}: {text!r}")
        words = text.split()  # any run of Unicode whitespace (newlines, tabs, NBSP) is one separator
        if self.score_stages:
            words = add_score_stages(" ".join(words)).split()
        if self.max_words is not None:
            words = words[: self.max_words]
        return " ".join(words)

    @classmethod
    def from_config(cls, cfg: Optional[Mapping[str, Any]] = None) -> "MedBlipTextProcessor":
        cfg = OmegaConf.create() if cfg is None else cfg
        return cls(**{key: cfg[key] for key in ("max_words", "score_stages") if key in cfg})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_words={self.max_words}, score_stages={self.score_stages})"
