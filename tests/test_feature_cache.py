"""The frozen-vision feature cache: same losses as uncached, gradients, invalidation, corruption, config."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lavis_medblip.models import MedBLIP
from lavis_medblip.models.feature_cache import VisionFeatureCache

LOSSES = ("loss", "loss_itc_text", "loss_itc_qa", "loss_lm")
TOKEN_SHAPE = (4**3 + 1, 64)  # tiny: 32³ volume, patch 8 → 64 patch tokens + CLS, ViT width 64


def build(tiny_config, cache_dir=None, seed: int = 0) -> MedBLIP:
    tiny_config.freeze_vision_stem = True
    tiny_config.vision_feature_cache = None if cache_dir is None else str(cache_dir)
    tiny_config.init_seed = seed  # same seed → same random weights, cached or not
    return MedBLIP.from_config(tiny_config)


def cache_files(cache_dir) -> list:
    return sorted(cache_dir.rglob("*.npy"))


def test_cached_losses_match_uncached_and_a_second_call_hits(tiny_config, samples, tmp_path):
    uncached = build(tiny_config).eval()
    cached = build(tiny_config, tmp_path).eval()
    expected = uncached(samples)

    first = cached(samples)  # fills
    assert (cached.feature_cache.hits, cached.feature_cache.misses) == (0, 2)
    files = cache_files(tmp_path)
    assert len(files) == 2
    stored = np.load(files[0], mmap_mode="r")
    assert stored.dtype == np.float16 and stored.shape == TOKEN_SHAPE
    second = cached(samples)  # hits
    assert (cached.feature_cache.hits, cached.feature_cache.misses) == (2, 2)

    for name in LOSSES:
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=0)  # a miss returns the stored tokens
        torch.testing.assert_close(first[name], expected[name], rtol=1e-3, atol=1e-3)  # fp16 rounding only
    ranking = cached.predict_answers(samples, ["not demented", "Alzheimer's disease"])
    torch.testing.assert_close(ranking.scores, uncached.predict_answers(samples, ["not demented",
                                                                                  "Alzheimer's disease"]).scores,
                               rtol=1e-3, atol=1e-3)


def test_gradients_reach_qformer_and_lora_but_not_the_vision_path(tiny_config, samples, tmp_path):
    model = build(tiny_config, tmp_path)
    model(samples)  # fill, so the backward below runs on cached tokens
    model.zero_grad(set_to_none=True)
    model(samples).loss.backward()
    assert model.feature_cache.hits == 2

    assert not any(p.requires_grad for p in model.visual_encoder.parameters())
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert not any(name.startswith("visual_encoder.") for name in with_grad)
    assert {"query_tokens", "ln_vision.weight", "llm_proj.weight"} <= with_grad
    assert any(name.startswith("Qformer.bert.encoder.layer.") for name in with_grad)
    assert any("lora_" in name for name in with_grad)


def test_default_keeps_the_stem_trainable(tiny_config):
    model = MedBLIP.from_config(tiny_config)
    assert model.feature_cache is None
    trainable = {name for name, p in model.visual_encoder.named_parameters() if p.requires_grad}
    assert trainable == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}


def test_changing_the_stem_weights_gives_new_keys(tiny_config, samples, tmp_path):
    model = build(tiny_config, tmp_path).eval()
    volume = samples["image"][0]
    before = model.feature_cache.entry_path(volume)
    assert build(tiny_config, tmp_path).feature_cache.entry_path(volume) == before  # same weights, same key
    model(samples)

    with torch.no_grad():
        model.visual_encoder.patch_embed.proj.weight.add_(0.01)
    after = model.feature_cache.entry_path(volume)
    assert after != before
    model(samples)
    assert model.feature_cache.misses == 4 and len(cache_files(tmp_path)) == 4

    # a stage-1 checkpoint's stem loaded later (load_state_dict copies in place) also changes the key
    other_stem = build(tiny_config, seed=1).visual_encoder.state_dict()
    model.visual_encoder.load_state_dict(other_stem)
    assert model.feature_cache.entry_path(volume) not in (before, after)
    assert model.feature_cache.entry_path(samples["image"][1]) != model.feature_cache.entry_path(volume)


def test_corrupt_entries_are_rebuilt(tiny_config, samples, tmp_path, caplog):
    model = build(tiny_config, tmp_path).eval()
    expected = model(samples).loss
    truncated, wrong_shape = cache_files(tmp_path)
    truncated.write_bytes(truncated.read_bytes()[:100])
    np.save(wrong_shape, np.zeros((3, 3), dtype=np.float16))

    with caplog.at_level(logging.WARNING):
        loss = model(samples).loss
    assert model.feature_cache.misses == 4 and "rebuilding" in caplog.text
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    for path in (truncated, wrong_shape):
        assert np.load(path).shape == TOKEN_SHAPE
    model(samples)
    assert model.feature_cache.hits == 2


def test_cache_without_a_frozen_stem_is_a_config_error(tiny_config, tmp_path):
    tiny_config.vision_feature_cache = str(tmp_path)
    with pytest.raises(ValueError, match="vision_feature_cache.*freeze_vision_stem"):
        MedBLIP.from_config(tiny_config)


def test_cache_refuses_an_encoder_unfrozen_after_setup(tiny_config, samples, tmp_path):
    model = build(tiny_config, tmp_path)
    model.visual_encoder.pos_embed.requires_grad = True
    with pytest.raises(RuntimeError, match="frozen vision encoder"):
        model(samples)


def test_volume_keys_replace_hashing_the_volume(tiny_config, samples, tmp_path):
    model = build(tiny_config).eval()
    cache = VisionFeatureCache(tmp_path, model.visual_encoder)
    tokens = cache.tokens(samples["image"], model._vision_tokens, volume_keys=["scan-a", "scan-b"])
    assert tokens.shape == (2, *TOKEN_SHAPE) and tokens.dtype == torch.float32
    swapped = cache.tokens(samples["image"].flip(0), model._vision_tokens, volume_keys=["scan-a", "scan-b"])
    torch.testing.assert_close(swapped, tokens, rtol=0, atol=0)  # served by key, not by content
    assert (cache.hits, cache.misses) == (2, 2)
