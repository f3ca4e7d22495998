"""``run.lr_scales``: per-parameter learning-rate multipliers on top of LAVIS's schedulers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lavis.common.optims import LinearWarmupCosineLRScheduler
from lavis_medblip.runners.runner import ScaledLRScheduler, lr_scale_for, scaled_param_groups
from lavis_medblip.tasks.base import scheduled_lr


class TwoParts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pretrained = nn.Linear(4, 4)
        self.new_head = nn.Linear(4, 2)
        self.frozen = nn.Linear(4, 4).requires_grad_(False)


def test_first_matching_pattern_wins():
    scales = {"new_head.bias": 2.0, "new_head.*": 30.0}
    assert lr_scale_for("new_head.bias", scales) == 2.0
    assert lr_scale_for("new_head.weight", scales) == 30.0
    assert lr_scale_for("pretrained.weight", scales) == 1.0


def test_groups_split_by_scale_and_weight_decay_and_skip_frozen_parameters():
    model = TwoParts()
    groups = scaled_param_groups(model, weight_decay=0.05, lr_scales={"new_head.*": 30.0})
    by_key = {(g["lr_scale"], g["weight_decay"]): g["params"] for g in groups}
    assert by_key[(1.0, 0.05)] == [model.pretrained.weight]
    assert by_key[(1.0, 0.0)] == [model.pretrained.bias]
    assert by_key[(30.0, 0.05)] == [model.new_head.weight]
    assert by_key[(30.0, 0.0)] == [model.new_head.bias]
    assert sum(len(g["params"]) for g in groups) == 4  # the frozen layer is left out

    with pytest.raises(ValueError, match=r"match no trainable parameter: \['frozen\.\*'\]"):
        scaled_param_groups(model, 0.05, {"frozen.*": 10.0})


def test_scheduled_lr_is_multiplied_per_group_at_every_step():
    model = TwoParts()
    optimizer = torch.optim.AdamW(scaled_param_groups(model, 0.05, {"new_head.*": 30.0}), lr=1e-4)
    lavis_scheduler = LinearWarmupCosineLRScheduler(
        optimizer=optimizer, max_epoch=4, min_lr=1e-6, init_lr=1e-4, warmup_steps=10, warmup_start_lr=1e-6
    )
    scheduler = ScaledLRScheduler(lavis_scheduler, optimizer)
    for epoch, step in [(0, 0), (0, 5), (0, 20), (2, 0)]:
        scheduler.step(cur_epoch=epoch, cur_step=step)
        lrs = {g["lr_scale"]: g["lr"] for g in optimizer.param_groups}
        assert lrs[30.0] == pytest.approx(30.0 * lrs[1.0])
    assert scheduler.max_epoch == 4  # everything else is the wrapped scheduler's


@pytest.mark.parametrize("scale", [0.1, 0.0])  # 0: a part held still
def test_the_logged_lr_is_the_schedules_when_the_first_group_is_scaled_down(scale):
    model = TwoParts()
    optimizer = torch.optim.AdamW(scaled_param_groups(model, 0.05, {"pretrained.*": scale}), lr=1e-4)
    lavis_scheduler = LinearWarmupCosineLRScheduler(
        optimizer=optimizer, max_epoch=4, min_lr=1e-6, init_lr=1e-4, warmup_steps=10, warmup_start_lr=1e-6
    )
    ScaledLRScheduler(lavis_scheduler, optimizer).step(cur_epoch=1, cur_step=0)
    unscaled = next(group["lr"] for group in optimizer.param_groups if group["lr_scale"] == 1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(scale * unscaled)  # the pretrained part, first by scale
    assert scheduled_lr(optimizer) == pytest.approx(unscaled)  # what the log and the loss curves show
