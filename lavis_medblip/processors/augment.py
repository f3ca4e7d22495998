"""Random train-time augmentation of a ``1 x S x S x S`` tensor in [0, 1] (returns the same shape).
The transforms draw from torch's global RNG, which DataLoader seeds differently in every worker
(numpy's global RNG would repeat the same augmentations across workers).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F


class RandomAffine3D:
    """Random rotation about each axis (degrees) and isotropic scaling, trilinear, zero fill."""

    def __init__(self, degrees: float = 5.0, scale: float = 0.05, probability: float = 0.5) -> None:
        self.degrees, self.scale, self.probability = float(degrees), float(scale), float(probability)

    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        if (self.degrees <= 0 and self.scale <= 0) or torch.rand(()) >= self.probability:
            return volume
        angles = (torch.rand(3, dtype=torch.float64) * 2 - 1) * math.radians(self.degrees)
        zoom = 1.0 + (float(torch.rand(())) * 2 - 1) * self.scale
        rotation = torch.eye(3, dtype=torch.float64)
        for axis, angle in enumerate(angles.tolist()):
            c, s = math.cos(angle), math.sin(angle)
            i, j = [a for a in range(3) if a != axis]
            step = torch.eye(3, dtype=torch.float64)
            step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
            rotation = step @ rotation
        theta = torch.zeros(1, 3, 4, dtype=torch.float32)
        theta[0, :, :3] = (rotation / zoom).float()
        grid = F.affine_grid(theta, [1, *volume.shape], align_corners=False)
        return F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]


class RandomElasticDeformation:
    """Smooth random warp, as healthy brains differ from each other after affine registration: Gaussian noise on
    a ``control_points``³ grid, upsampled trilinearly and scaled to an RMS displacement of ``voxels``; trilinear,
    zero fill."""

    def __init__(self, voxels: float = 0.0, control_points: int = 5, probability: float = 0.5) -> None:
        self.voxels, self.control_points, self.probability = float(voxels), int(control_points), float(probability)

    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        if self.voxels <= 0 or torch.rand(()) >= self.probability:
            return volume
        size = tuple(volume.shape[1:])
        coarse = torch.randn(1, 3, *(self.control_points,) * 3)
        field = F.interpolate(coarse, size=size, mode="trilinear", align_corners=True)[0].movedim(0, -1)
        field = field * (self.voxels / field.pow(2).sum(-1).mean().sqrt())
        # grid_sample reads (x, y, z) = (last, middle, first) tensor axis, in [-1, 1] units of each axis
        field = field * (2.0 / torch.tensor(size[::-1], dtype=field.dtype))
        identity = F.affine_grid(torch.eye(3, 4)[None], [1, *volume.shape], align_corners=False)
        return F.grid_sample(volume[None], identity + field, mode="bilinear", padding_mode="zeros",
                             align_corners=False)[0]


class RandomIntensityJitter:
    """Random gamma and contrast: x -> (x ** gamma) * c, with log-gamma and c - 1 within +-strength."""

    def __init__(self, strength: float = 0.1, probability: float = 0.5) -> None:
        self.strength, self.probability = float(strength), float(probability)

    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        if self.strength <= 0 or torch.rand(()) >= self.probability:
            return volume
        gamma = math.exp((float(torch.rand(())) * 2 - 1) * self.strength)
        contrast = 1.0 + (float(torch.rand(())) * 2 - 1) * self.strength
        return volume.clamp(min=0).pow(gamma).mul_(contrast).clamp_(0.0, 1.0)


class RandomBiasField:
    """Smooth multiplicative field (MRI coil inhomogeneity): exp of an upsampled 4^3 Gaussian grid."""

    def __init__(self, strength: float = 0.2, probability: float = 0.5) -> None:
        self.strength, self.probability = float(strength), float(probability)

    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        if self.strength <= 0 or torch.rand(()) >= self.probability:
            return volume
        coarse = torch.randn(1, 1, 4, 4, 4) * self.strength
        field = F.interpolate(coarse, size=tuple(volume.shape[1:]), mode="trilinear", align_corners=True)[0]
        return volume.mul(field.exp_()).clamp_(0.0, 1.0)


class RandomGaussianNoise:
    """Additive Gaussian noise with standard deviation ``std``."""

    def __init__(self, std: float = 0.01, probability: float = 0.5) -> None:
        self.std, self.probability = float(std), float(probability)

    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        if self.std <= 0 or torch.rand(()) >= self.probability:
            return volume
        return volume.add(torch.randn_like(volume), alpha=self.std).clamp_(0.0, 1.0)


DEFAULT_AUGMENT = {
    "affine_degrees": 5.0,
    "affine_scale": 0.05,
    "elastic_voxels": 0.0,  # RMS displacement of a smooth random warp; 0: off
    "elastic_control_points": 5,  # per axis: the warp's smoothness
    "intensity_jitter": 0.1,
    "bias_field": 0.2,
    "noise_std": 0.01,
    "probability": 0.5,
}


def build_augmentation(options: Optional[Mapping[str, Any]]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """Augmentation transforms from a config mapping (missing keys take ``DEFAULT_AUGMENT``)."""
    unknown = set(options or {}) - set(DEFAULT_AUGMENT)
    if unknown:
        raise ValueError(f"unknown augment option(s) {sorted(unknown)}; known: {sorted(DEFAULT_AUGMENT)}")
    opts = {**DEFAULT_AUGMENT, **dict(options or {})}
    p = float(opts["probability"])
    return [
        RandomAffine3D(opts["affine_degrees"], opts["affine_scale"], p),
        RandomElasticDeformation(opts["elastic_voxels"], opts["elastic_control_points"], p),
        RandomBiasField(opts["bias_field"], p),
        RandomIntensityJitter(opts["intensity_jitter"], p),
        RandomGaussianNoise(opts["noise_std"], p),
    ]
