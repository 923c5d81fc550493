"""TrainConfig resolution and validation, and the plain-line progress output."""

from __future__ import annotations

import io

import pytest

from bigbatch import BatchPlanError
from bigbatch.app.config import ConfigError, TrainConfig
from bigbatch.app.progress import Progress


@pytest.mark.parametrize(("kwargs", "triple"), [
    ({}, (32, 8, 4)),
    ({"micro_batch": 4}, (32, 4, 8)),
    ({"accum_steps": 2}, (32, 16, 2)),
    ({"global_batch": 64}, (64, 8, 8)),
    ({"global_batch": 24}, (24, 8, 3)),
    ({"global_batch": 16, "accum_steps": 4}, (16, 4, 4)),
    ({"global_batch": 16, "micro_batch": 2, "accum_steps": 8}, (16, 2, 8)),
])
def test_batch_triple_resolution(kwargs, triple) -> None:
    plan = TrainConfig.of(**kwargs).plan()
    assert (plan.global_batch, plan.micro_batch, plan.accum_steps) == triple


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"global_batch": 16, "micro_batch": 2, "accum_steps": 4}, BatchPlanError,
     "global_batch 16 is not micro_batch 2 × accum_steps 4 × world 1 = 8"),
    ({"micro_batch": 5}, BatchPlanError, "not divisible by micro_batch 5"),
    ({"steps": 0}, ConfigError, "--steps must be positive, got 0"),
    ({"warmup": -1}, ConfigError, "--warmup must be 0 or more"),
    ({"lr": float("nan")}, ConfigError, "--lr must be a positive finite number"),
    ({"clip": -1.0}, ConfigError, "--clip must be 0"),
    ({"d_model": 130}, ConfigError, "--d-model 130 is not divisible by --n-head 4"),
    ({"schedule": "linear"}, ConfigError, "--schedule must be one of constant, cosine"),
    ({"steps": "10"}, ConfigError, "--steps must be int, got '10'"),
    ({"steps": 2.5}, ConfigError, "--steps must be int, got 2.5"),
    ({"overwrite": "yes"}, ConfigError, "--overwrite must be bool"),
    ({"global_batch": 30}, BatchPlanError,
     "micro-batch 8 is the default: give --micro-batch or --accum-steps to cut global batch 30"),
    ({"micro_batch": "x"}, ConfigError, "--micro-batch must be int or 'auto', got 'x'"),
    ({"bogus": 1}, ConfigError, "unknown key bogus"),
])
def test_validation_messages(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        TrainConfig.of(**kwargs)


def test_clip_zero_means_off() -> None:
    assert TrainConfig.of(clip=0.0).optim.clip_norm is None
    assert TrainConfig.of(clip=0.5).optim.clip_norm == 0.5


def test_plain_progress_lines_count_optimizer_steps() -> None:
    stream = io.StringIO()  # not a terminal: plain lines
    bar = Progress(total=40, stream=stream, every=10)
    for step in range(1, 41):
        bar.update(step, loss=1.0, tokens_per_s=1000.0, lr=1e-3)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["10/40", "20/40", "30/40", "40/40"]
    assert "eta" in lines[0] and "tok/s" in lines[0]
