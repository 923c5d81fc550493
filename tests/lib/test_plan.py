"""BatchPlan: the arithmetic global = micro × accum × world, cycles and split."""

from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bigbatch import BatchPlan, BatchPlanError

sizes = st.integers(min_value=1, max_value=64)


@given(m=sizes, k=sizes, w=st.integers(1, 8))
def test_any_two_derive_the_third(m: int, k: int, w: int) -> None:
    g = m * k * w
    for plan in (
        BatchPlan(global_batch=g, micro_batch=m, world_size=w),
        BatchPlan(global_batch=g, accum_steps=k, world_size=w),
        BatchPlan(micro_batch=m, accum_steps=k, world_size=w),
        BatchPlan(global_batch=g, micro_batch=m, accum_steps=k, world_size=w),
    ):
        assert (plan.global_batch, plan.micro_batch, plan.accum_steps) == (g, m, k)
        assert plan.world_size == w
        assert plan.local_batch == m * k


@given(g=st.integers(1, 4096), m=sizes, w=st.integers(1, 8))
def test_non_divisible_is_refused_with_the_numbers(g: int, m: int, w: int) -> None:
    if g % (m * w) == 0:
        assert BatchPlan(global_batch=g, micro_batch=m, world_size=w).accum_steps == g // (m * w)
    else:
        with pytest.raises(BatchPlanError) as e:
            BatchPlan(global_batch=g, micro_batch=m, world_size=w)
        assert f"global_batch {g} is not divisible by micro_batch {m} × world {w}" in str(e.value)


@given(m=sizes, k=sizes, w=st.integers(1, 4), delta=st.integers(1, 5))
def test_inconsistent_triple_is_refused(m: int, k: int, w: int, delta: int) -> None:
    g = m * k * w + delta
    with pytest.raises(BatchPlanError) as e:
        BatchPlan(global_batch=g, micro_batch=m, accum_steps=k, world_size=w)
    assert f"global_batch {g} is not micro_batch {m} × accum_steps {k} × world {w}" in str(e.value)


def test_issue_example_message() -> None:
    with pytest.raises(BatchPlanError, match=r"global_batch 250 is not micro_batch 8 × "
                       r"accum_steps 32 × world 1 = 256"):
        BatchPlan(global_batch=250, micro_batch=8, accum_steps=32, world_size=1)


def test_accum_steps_non_divisible_message() -> None:
    with pytest.raises(BatchPlanError, match="not divisible by accum_steps 3 × world 2 = 6"):
        BatchPlan(global_batch=32, accum_steps=3, world_size=2)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "8"])
@pytest.mark.parametrize("name", ["global_batch", "micro_batch", "accum_steps", "world_size"])
def test_non_positive_or_non_int_sizes(name: str, bad: object) -> None:
    kwargs: dict[str, object] = {"global_batch": 16, "micro_batch": 4}
    kwargs[name] = bad
    with pytest.raises(BatchPlanError, match=f"{name} must be a positive integer, got"):
        BatchPlan(**kwargs)  # type: ignore[arg-type]


def test_fewer_than_two_sizes() -> None:
    with pytest.raises(BatchPlanError, match="give at least two of"):
        BatchPlan(global_batch=16)
    with pytest.raises(BatchPlanError, match="give at least two of"):
        BatchPlan()


def test_bad_tail() -> None:
    with pytest.raises(BatchPlanError, match="tail must be 'step' or 'drop', got 'keep'"):
        BatchPlan(global_batch=16, micro_batch=4, tail="keep")  # type: ignore[arg-type]


def test_world_defaults_to_one_without_process_group() -> None:
    assert BatchPlan(global_batch=16, micro_batch=4).world_size == 1


@given(n=st.integers(0, 50), k=st.integers(1, 9))
def test_cycles_group_and_tail(n: int, k: int) -> None:
    step = BatchPlan(micro_batch=1, accum_steps=k, world_size=1)
    drop = BatchPlan(micro_batch=1, accum_steps=k, world_size=1, tail="drop")
    got = list(step.cycles(range(n)))
    assert [x for c in got for x in c] == list(range(n))
    assert all(len(c) == k for c in got[:-1])
    if n % k:
        assert len(got[-1]) == n % k
    assert list(drop.cycles(range(n))) == [c for c in got if len(c) == k]


def test_cycles_read_lazily() -> None:
    seen: list[int] = []

    def stream():
        for i in range(10):
            seen.append(i)
            yield i

    it = BatchPlan(micro_batch=1, accum_steps=3, world_size=1).cycles(stream())
    assert next(it) == [0, 1, 2]
    assert seen == [0, 1, 2]


class Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_split_structures() -> None:
    plan = BatchPlan(micro_batch=3, accum_steps=4, world_size=1)
    x = torch.arange(10 * 2).reshape(10, 2)
    y = torch.arange(10)
    for batch in (x, {"x": x, "y": y}, (x, y), [x, {"y": y}], Pair(x, y), OrderedDict(x=x)):
        parts = plan.split(batch)
        assert len(parts) == 4
        assert type(parts[0]) is type(batch)
        flat = [p if isinstance(p, torch.Tensor) else p[0] if not isinstance(p, dict) else p["x"]
                for p in parts]
        assert [len(f) for f in flat] == [3, 3, 3, 1]
        assert torch.equal(torch.cat(flat), x)
    assert torch.equal(plan.split({"x": x, "y": y})[2]["y"], y[6:9])


def test_split_errors() -> None:
    plan = BatchPlan(micro_batch=2, accum_steps=2, world_size=1)
    with pytest.raises(BatchPlanError, match="batch of 5 rows is more than one cycle of "
                       "micro_batch 2 × accum_steps 2 = 4 rows"):
        plan.split(torch.zeros(5))
    with pytest.raises(BatchPlanError, match=r"batch\['a'\] has 4 rows but batch\['b'\] has 3"):
        plan.split({"a": torch.zeros(4), "b": torch.zeros(3)})
    with pytest.raises(BatchPlanError, match="of type str"):
        plan.split({"a": torch.zeros(4), "names": ["p", "q", "r", "s"]})
    with pytest.raises(BatchPlanError, match="0 rows"):
        plan.split(torch.zeros(0, 3))
    with pytest.raises(BatchPlanError, match="0-d tensor"):
        plan.split(torch.tensor(1.0))
    with pytest.raises(BatchPlanError, match="holds no tensors"):
        plan.split({})
