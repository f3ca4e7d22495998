"""On-disk cache of the frozen 3D vision encoder's output tokens, one float16 ``.npy`` per volume:
with the whole vision path frozen, ``vision_feature_cache: <dir>`` lets later epochs skip the stem
and the ViT (design and costs: README, Design notes).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from torch import nn

from lavis_medblip.processors.volume_cache import encode, settings_sha256
from lavis_medblip.storage import ArrayStore

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
#: Bump when the stored array's meaning changes (e.g. caching after ln_vision instead of before).
FEATURE_CACHE_FORMAT = "medblip-vit-tokens-pre-ln_vision-v1"
# Hashed as VolumeCache hashes its settings, so entries written before storage.py keep their keys.
FEATURE_SETTINGS_KEY = settings_sha256({"format": FEATURE_CACHE_FORMAT, "cache_storage_dtype": "float16"})
_HASH_SCALARS = (bool, int, float, str)


def _is_setting(value: object) -> bool:
    """Scalars and tuples of scalars (e.g. a Conv3d's stride) describe the architecture."""
    if isinstance(value, tuple):
        return all(isinstance(item, _HASH_SCALARS) for item in value)
    return isinstance(value, _HASH_SCALARS)


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (any dtype, any device)."""
    flat = tensor.detach().contiguous().view(-1)
    digest = hashlib.sha256(f"{flat.dtype}:{tuple(tensor.shape)}:".encode())
    # Viewing as bytes works for dtypes numpy lacks (bfloat16).
    digest.update(memoryview(flat.view(torch.uint8).cpu().numpy()))
    return digest.hexdigest()


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return sorted([*module.named_parameters(), *module.named_buffers()], key=lambda item: item[0])


def module_sha256(module: nn.Module) -> str:
    """sha256 of a module's architecture (module types, scalar settings) and every weight's bytes."""
    digest = hashlib.sha256()
    for name, child in module.named_modules():
        settings = {key: value for key, value in vars(child).items()
                    if not key.startswith("_") and key != "training" and _is_setting(value)}
        digest.update(f"{name}:{type(child).__qualname__}:{sorted(settings.items())}\n".encode())
    for name, tensor in _named_tensors(module):
        digest.update(f"{name}:".encode())
        digest.update(tensor_sha256(tensor).encode())
    return digest.hexdigest()


class VisionFeatureCache:
    """Serves ``encoder.forward_features`` per volume from ``cache_dir``, computing only the misses.

    For ``freeze_vision_stem: true`` (3D stem *and* ViT blocks frozen, e.g. a second stage that
    trains only the Q-Former and LoRA), where a volume always yields the same ViT tokens. What is
    cached are the tokens *before* ``ln_vision``, which is trainable in MedBLIP (as in BLIP-2; it is
    loaded with the Q-Former), so it runs live on them and the cache stays valid while it learns.

    An entry's key is ``sha256(volume key : encoder key : format)``: the volume key is
    :func:`tensor_sha256` of the preprocessed volume (or a caller's ``volume_keys``), the encoder key
    :func:`module_sha256` of the encoder's weights and architecture (so a different stem or ViT never
    reads another one's entries), the format :data:`FEATURE_CACHE_FORMAT`. With random augmentation
    every training volume is new and the cache never hits: use ``augment: false`` in the train
    processor (the eval processor never augments).

    Entries live in an :class:`lavis_medblip.storage.ArrayStore` (written whole, then renamed into
    place; read through a copy-on-write memory map), as the volume cache's do. The cache runs where
    the model runs (the training process of each rank, not the DataLoader workers); any number of
    ranks or runs may share one directory: a reader sees no entry or a complete one. An unreadable
    entry, or one of the wrong shape or dtype, is rebuilt. On a miss the float16-rounded tokens are
    returned, so a filling and a hitting call give identical results; against the uncached path they
    differ by float16 rounding only.

    ``hits``/``misses`` count volumes. The encoder must be frozen entirely (checked on every call):
    cached tokens carry no gradient, so a trainable stem would silently stop learning.
    """

    def __init__(self, cache_dir: PathLike, encoder: nn.Module) -> None:
        self.encoder = encoder
        self.store = ArrayStore(cache_dir)
        self.hits = self.misses = 0
        self._encoder_key_memo: tuple[tuple, str] | None = None

    @property
    def cache_dir(self) -> Path:
        return self.store.root

    def encoder_key(self) -> str:
        """Hash of the encoder's weights and architecture, recomputed only when a tensor changed.

        Memoised on each tensor's storage and in-place version counter: ``load_state_dict`` (e.g. a
        stage-1 checkpoint's stem) or an in-place update re-hashes on the next call; edits through
        ``.data`` bypass version counters, so call :meth:`forget_encoder_key` after those.
        """
        # data_ptr catches replaced tensors, _version catches in-place updates (copy_, add_, ...).
        state = tuple((name, tensor.data_ptr(), tensor._version, tensor.dtype, tuple(tensor.shape))
                      for name, tensor in _named_tensors(self.encoder))
        if self._encoder_key_memo is None or self._encoder_key_memo[0] != state:
            self._encoder_key_memo = (state, module_sha256(self.encoder))
        return self._encoder_key_memo[1]

    def forget_encoder_key(self) -> None:
        """Re-hash the encoder on the next call (after edits the version counters cannot see)."""
        self._encoder_key_memo = None

    def entry_key(self, volume_key: str, encoder_key: str) -> str:
        return hashlib.sha256(f"{volume_key}:{encoder_key}:{FEATURE_SETTINGS_KEY}".encode()).hexdigest()

    def entry_path(self, volume: torch.Tensor) -> Path:
        """Where one volume's (1, S, S, S) tokens are stored for the current encoder weights."""
        return self.store.path(self.entry_key(tensor_sha256(volume), self.encoder_key()))

    def tokens(
        self,
        image: torch.Tensor,
        compute: Callable[[torch.Tensor], torch.Tensor],
        volume_keys: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Tokens (B, N+1, width) float32 for volumes (B, 1, S, S, S); ``compute`` runs on the misses.

        Args:
            image: the preprocessed volumes.
            compute: ``visual_encoder.forward_features``, run (without a graph) on the missed volumes only.
            volume_keys: one stable content id per volume, computed by the dataset; replaces hashing
                the volume tensors (cheaper where the ViT is fast, e.g. ViT-g on a GPU).
        """
        trainable = [name for name, p in self.encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise RuntimeError(f"vision_feature_cache needs a frozen vision encoder, but {trainable[:3]} "
                               f"require grad; set model.freeze_vision_stem: true")
        if volume_keys is None:
            volume_keys = [tensor_sha256(volume) for volume in image]
        if len(volume_keys) != image.shape[0]:
            raise ValueError(f"got {len(volume_keys)} volume keys for a batch of {image.shape[0]}")
        encoder_key = self.encoder_key()
        expected_shape = self._token_shape()
        entries = [self.entry_key(key, encoder_key) for key in volume_keys]
        arrays = [self._load(entry, expected_shape) for entry in entries]
        missing = [index for index, array in enumerate(arrays) if array is None]
        self.hits += len(entries) - len(missing)
        self.misses += len(missing)
        if missing:
            with torch.no_grad():
                computed = compute(image[missing])
            for index, row in zip(missing, computed):
                arrays[index] = self._save(entries[index], row)
        # np.stack copies out of the memory maps into one batch array.
        return torch.from_numpy(np.stack(arrays)).to(device=image.device, dtype=torch.float32)

    def _token_shape(self) -> tuple[int, int] | None:
        pos_embed = getattr(self.encoder, "pos_embed", None)  # (1, N+1, width) in LAVIS's ViT
        return tuple(pos_embed.shape[1:]) if isinstance(pos_embed, torch.Tensor) else None

    def _load(self, key: str, expected_shape: tuple[int, int] | None) -> np.ndarray | None:
        array = self.store.load(key)  # None when absent or unreadable (logged)
        if array is None:
            return None
        if array.dtype != np.float16 or (expected_shape is not None and array.shape != expected_shape):
            logger.warning("Ignoring cache entry %s of shape %s %s (expected %s float16); rebuilding it",
                           self.store.path(key), array.shape, array.dtype, expected_shape)
            return None
        return array

    def _save(self, key: str, tokens: torch.Tensor) -> np.ndarray:
        array = encode(tokens.detach().float().cpu(), "float16")
        if not np.isfinite(array).all():
            # float16 overflow (|x| > 65504): serve full precision uncached rather than store inf.
            logger.warning("ViT tokens overflow float16; not caching %s", self.store.path(key))
            return tokens.detach().float().cpu().numpy()
        try:
            self.store.save(key, array)
        except OSError as exc:
            # A full or read-only cache disk must not stop training: serve the result uncached.
            logger.warning("Could not write cache entry %s (%s); continuing without caching it", self.store.path(key), exc)
        return array
