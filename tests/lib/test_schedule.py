"""Batch-size schedules: K follows the table and the ramp exactly; adaptive K moves with noise."""

from __future__ import annotations

import math

import pytest

from bigbatch.schedule import ScheduleError, lr_factor, parse_accum_schedule


def run(schedule, steps: int, noise=lambda step: math.nan) -> list[int]:
    ks = []
    for step in range(steps):
        ks.append(schedule.next_k(step, noise(step)))
        schedule.took(ks[-1])
    return ks


def test_table_is_followed_exactly() -> None:
    s = parse_accum_schedule("0:4,3:8,5:2", micro_batch=2, world_size=2, k_final=8)
    assert run(s, 7) == [4, 4, 4, 8, 8, 2, 2]
    assert s.samples == (4 * 3 + 8 * 2 + 2 * 2) * 2 * 2


def test_ramp_follows_its_definition() -> None:
    """ramp:4:100 to a global batch of 32 (micro-batch 2 on 2 ranks: 4 samples a micro-batch).

    By the definition (not the implementation's expression): before step t, with S samples seen,
    the global batch is 4 + min(1, S/100)·(32 − 4) = 4 + 0.28·S samples until S reaches 100,
    rounded down to whole micro-batches of 4, at least one. By hand:

    ====  ===  ==================  ==
    step    S  4 + 0.28·S          K
    ====  ===  ==================  ==
    0       0  4                   1
    1       4  5.12                1
    2       8  6.24                1
    3      12  7.36                1
    4      16  8.48                2
    5      24  10.72               2
    6      32  12.96               3
    7      44  16.32               4
    8      60  20.8                5
    9      80  26.4                6
    10    104  32 (S ≥ 100)        8
    11    136  32                  8
    ====  ===  ==================  ==
    """
    s = parse_accum_schedule("ramp:4:100", micro_batch=2, world_size=2, k_final=8)
    assert run(s, 12) == [1, 1, 1, 1, 2, 2, 3, 4, 5, 6, 8, 8]
    assert s.samples == 168  # 136 + the last step's 8 micro-batches of 4


@pytest.mark.parametrize(("noise_samples", "direction"), [(400.0, "up"), (10.0, "down")])
def test_adaptive_moves_with_the_noise_scale_within_bounds(noise_samples: float,
                                                           direction: str) -> None:
    s = parse_accum_schedule("adaptive:2:16:3", micro_batch=4, world_size=2, k_final=8)
    ks = run(s, 12, noise=lambda step: noise_samples)
    assert all(2 <= k <= 16 for k in ks)
    assert ks[-1] == (16 if direction == "up" else 2)
    changes = [i for i in range(1, len(ks)) if ks[i] != ks[i - 1]]
    assert all(b - a >= 3 for a, b in zip(changes, changes[1:]))


def test_adaptive_waits_for_an_estimate_and_respects_every() -> None:
    s = parse_accum_schedule("adaptive:2:64:5", micro_batch=1, world_size=1, k_final=8)
    assert run(s, 3) == [8, 8, 8]  # no estimate yet: K stays
    ks = [s.next_k(step, noise) for step, noise in [(3, 32.0), (5, 32.0), (6, 4.0), (10, 4.0)]]
    assert ks == [8, 32, 32, 4]  # K holds for 5 steps after each change (the start counts)


def test_state_round_trip() -> None:
    a = parse_accum_schedule("ramp:2:100", micro_batch=2, world_size=1, k_final=8)
    run(a, 5)
    b = parse_accum_schedule("ramp:2:100", micro_batch=2, world_size=1, k_final=8)
    b.load_state_dict(a.state_dict())
    assert run(a, 10) == run(b, 10)


@pytest.mark.parametrize("spec", ["", "1:4", "0:4,0:8", "0:0", "ramp:0:10", "ramp:1",
                                  "adaptive:4:2:1", "adaptive:1:8:1", "adaptive:a:b:c",
                                  "0-4"])
def test_bad_specs_say_what_is_accepted(spec: str) -> None:
    with pytest.raises(ScheduleError, match="accum-schedule"):
        parse_accum_schedule(spec, micro_batch=2, world_size=1, k_final=8)


def test_lr_factor() -> None:
    assert lr_factor("none", 64, 16) == 1.0
    assert lr_factor("linear", 64, 16) == 4.0
    assert lr_factor("sqrt", 64, 16) == 2.0
    with pytest.raises(ScheduleError):
        lr_factor("cubic", 64, 16)
