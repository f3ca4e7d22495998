"""Calibrated class probabilities: temperature scaling plus a per-class bias on the candidates' scores.

``predict_answers`` ranks candidate answers by their length-normalised log-likelihood (the raw
*scores*). Their softmax is a poor probability: a model trained on one template brain may be sure of
the wrong class everywhere else. :func:`fit_calibration` fits, on held-out scores of known labels,

    probabilities = softmax(scores / temperature + class_bias)

by minimising the negative log-likelihood (Guo et al. 2017, "On calibration of modern neural
networks"; the bias is their vector scaling restricted to a shared scale). The raw scores never
change; probabilities and predictions do. :class:`Calibration` holds only plain values, so it is
stored in a checkpoint (key ``"calibration"``) that ``torch.load(weights_only=True)`` reads.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

import torch
from torch.nn import functional as F

from lavis_medblip.models.weights import CheckpointError

#: The key of a checkpoint dict that holds :meth:`Calibration.to_dict`.
CHECKPOINT_KEY = "calibration"


@dataclass
class Calibration:
    """``softmax(scores / temperature + class_bias)``; the defaults are the identity (the raw softmax)."""

    temperature: float = field(default=1.0, metadata={
        "help": "divides the scores; above 1 softens over-confident probabilities, below 1 sharpens them"})
    class_bias: list[float] | None = field(default=None, metadata={
        "help": "added to each candidate's scaled score, one per entry of answers (or per candidate position "
                "when answers is null); null: no bias"})
    answers: list[str] | None = field(default=None, metadata={
        "help": "the candidate answers it was fit on, in class_bias order; candidates outside them are left raw"})
    num_samples: int = field(default=0, metadata={"help": "how many labelled samples it was fit on (0: not fit)"})

    def __post_init__(self) -> None:
        self.temperature = float(self.temperature)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"calibration temperature must be a positive number, got {self.temperature}")
        if self.class_bias is not None:
            self.class_bias = [float(value) for value in self.class_bias]
            if not all(math.isfinite(value) for value in self.class_bias):
                raise ValueError(f"calibration class_bias must be finite numbers, got {self.class_bias}")
        if self.answers is not None:
            self.answers = [str(answer) for answer in self.answers]
            if self.class_bias is not None and len(self.answers) != len(self.class_bias):
                raise ValueError(f"calibration has {len(self.class_bias)} class_bias values for "
                                 f"{len(self.answers)} answers {self.answers}")

    @property
    def is_identity(self) -> bool:
        """True when it leaves the softmax of the scores as it is (no calibration)."""
        return self.temperature == 1.0 and not any(self.class_bias or ())

    def covers(self, candidates: Sequence[str]) -> bool:
        """Whether it applies to these candidates: each is one of ``answers`` (or no answers are named)."""
        return self.answers is None or all(candidate in self.answers for candidate in candidates)

    def bias_for(self, candidates: Sequence[str]) -> list[float]:
        """The bias of each candidate: by name when ``answers`` is set, else by position."""
        if self.class_bias is None:
            return [0.0] * len(candidates)
        if self.answers is not None:
            return [self.class_bias[self.answers.index(candidate)] for candidate in candidates]
        if len(candidates) != len(self.class_bias):
            raise ValueError(f"calibration has {len(self.class_bias)} class biases but {len(candidates)} candidates "
                             f"were ranked; fit it on the same candidates")
        return list(self.class_bias)

    def logits(self, scores: torch.Tensor, candidates: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
        """Calibrated logits (B, C) of raw ``scores`` (B, C); ``candidates``: each row's candidate answers.

        A row whose candidates it does not :meth:`covers` keeps its raw scores; the identity returns
        ``scores`` itself, so an uncalibrated model ranks exactly as before.
        """
        if self.is_identity:
            return scores
        if candidates is None:  # the columns are the candidates it was fit on, in that order
            candidates = [self.answers or [""] * scores.shape[1]] * scores.shape[0]
        if len(candidates) != scores.shape[0] or any(len(row) != scores.shape[1] for row in candidates):
            raise ValueError(f"calibration: candidates do not match the scores of shape {tuple(scores.shape)}")
        covered = torch.tensor([self.covers(row) for row in candidates], device=scores.device)
        bias = torch.tensor([self.bias_for(row) if self.covers(row) else [0.0] * len(row) for row in candidates],
                            dtype=scores.dtype, device=scores.device)
        return torch.where(covered[:, None], scores / self.temperature + bias, scores)

    def apply(self, scores: torch.Tensor, candidates: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
        """Calibrated probabilities (B, C): the softmax of :meth:`logits`."""
        return self.logits(scores, candidates).softmax(dim=-1)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (float, lists, int): what a ``weights_only`` checkpoint may hold."""
        return asdict(self)

    def checkpoint_entry(self) -> dict[str, Any]:
        """What a checkpoint dict gets: ``{"calibration": values}``, nothing for the identity."""
        return {} if self.is_identity else {CHECKPOINT_KEY: self.to_dict()}

    @classmethod
    def from_dict(cls, values: Any) -> "Calibration":
        """Read :meth:`to_dict`'s values; anything else is a ``ValueError`` saying what is wrong."""
        if not isinstance(values, Mapping):
            raise ValueError(f"'{CHECKPOINT_KEY}' holds a {type(values).__name__}, not a dict of values")
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"'{CHECKPOINT_KEY}' has unknown keys {unknown}; known: {sorted(known)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise ValueError(f"'{CHECKPOINT_KEY}' is not a valid calibration: {error}") from None

    @classmethod
    def from_checkpoint(cls, checkpoint: Any, source: str = "checkpoint") -> "Calibration":
        """The calibration a loaded checkpoint holds, the identity when it holds none; a bad one is a
        :class:`CheckpointError` naming ``source`` (the file)."""
        if not isinstance(checkpoint, Mapping) or checkpoint.get(CHECKPOINT_KEY) is None:
            return cls()
        try:
            return cls.from_dict(checkpoint[CHECKPOINT_KEY])
        except ValueError as error:
            raise CheckpointError(source, str(error)) from None

    def describe(self) -> str:
        """One line for logs: the temperature and the bias of each answer."""
        if self.is_identity:
            return "none (raw likelihood softmax)"
        names = self.answers or [f"#{index}" for index in range(len(self.class_bias or ()))]
        bias = ", ".join(f"{name}: {value:+.3f}" for name, value in zip(names, self.class_bias or ()))
        parts = [f"temperature {self.temperature:.3f}", f"class bias {{{bias}}}" if bias else "",
                 f"fit on {self.num_samples} samples" if self.num_samples else ""]
        return ", ".join(part for part in parts if part)


@dataclass
class CalibrationFitOptions:
    """How :func:`fit_calibration` fits; the defaults keep it stable on a few dozen samples."""

    min_temperature: float = field(default=0.02, metadata={"help": "lower bound of the fitted temperature"})
    max_temperature: float = field(default=50.0, metadata={"help": "upper bound of the fitted temperature"})
    fit_bias: bool = field(default=True, metadata={"help": "fit a per-class bias too; false: temperature only"})
    bias_prior_std: float = field(default=2.0, metadata={
        "help": "std (nats) of a Gaussian prior on each class bias, i.e. an L2 penalty |bias|² / (2 std²) on the "
                "summed NLL: it keeps the bias finite on a few samples (a class missing, or perfectly separated) "
                "and fixes its free offset (the softmax ignores a common shift); on many samples it is negligible"})
    max_iter: int = field(default=200, metadata={"help": "LBFGS iterations"})

    def __post_init__(self) -> None:
        if not 0 < self.min_temperature < 1 < self.max_temperature:  # the fit starts from 1, inside the bounds
            raise ValueError(f"calibration temperature bounds must satisfy 0 < min < 1 < max, got "
                             f"[{self.min_temperature}, {self.max_temperature}]")
        if not self.bias_prior_std > 0 or self.max_iter < 1:
            raise ValueError(f"calibration bias_prior_std must be > 0 and max_iter >= 1, got {self.bias_prior_std}, "
                             f"{self.max_iter}")


def fit_calibration(
    scores: Any,
    labels: Any,
    answers: Sequence[str] | None = None,
    options: CalibrationFitOptions | None = None,
) -> Calibration:
    """Fit a temperature (and a per-class bias) on raw ``scores`` (N, C) of samples with ``labels`` (N,).

    Minimises the NLL (plus a weak Gaussian prior on the bias) with LBFGS in float64, starting from the
    identity: deterministic, and the temperature stays in ``[min_temperature, max_temperature]``
    (a sigmoid of the log temperature). ``answers`` names the C candidates, so that the bias follows
    the class whatever subset or order is ranked later.
    """
    options = options or CalibrationFitOptions()
    scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    labels = torch.as_tensor(labels, dtype=torch.long).detach().cpu()
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] < 2:
        raise ValueError(f"fit_calibration needs scores of shape (samples, candidates >= 2), got {tuple(scores.shape)}")
    if labels.shape != scores.shape[:1]:
        raise ValueError(f"fit_calibration: {scores.shape[0]} score rows but labels of shape {tuple(labels.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("fit_calibration: the scores hold NaN or infinite values")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"fit_calibration: labels must index the {scores.shape[1]} candidates, got "
                         f"{sorted(set(labels.tolist()))}")
    if answers is not None and len(answers) != scores.shape[1]:
        raise ValueError(f"fit_calibration: {len(answers)} answers for {scores.shape[1]} score columns")

    bias_l2 = 1.0 / (2 * options.bias_prior_std ** 2 * scores.shape[0])  # the prior, per sample of the mean NLL
    low, high = math.log(options.min_temperature), math.log(options.max_temperature)
    start = -low / (high - low)  # the sigmoid's value at temperature 1
    unbounded = torch.tensor([math.log(start / (1 - start))], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(scores.shape[1], dtype=torch.float64, requires_grad=options.fit_bias)
    optimizer = torch.optim.LBFGS([unbounded, bias] if options.fit_bias else [unbounded], lr=1.0,
                                  max_iter=options.max_iter, line_search_fn="strong_wolfe")

    def temperature() -> torch.Tensor:
        return torch.exp(low + (high - low) * torch.sigmoid(unbounded))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(scores / temperature() + bias, labels) + bias_l2 * bias.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Calibration(temperature=float(temperature().detach()),
                       class_bias=bias.detach().tolist() if options.fit_bias else None,
                       answers=list(answers) if answers is not None else None, num_samples=int(scores.shape[0]))
