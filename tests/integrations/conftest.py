"""Each test starts without Accelerate's process-wide state (the HF Trainer builds on it too):
its singletons refuse a second ``Accelerator`` with other settings in the same process. And
each runs on one torch thread (restored after): the models are tiny, and two spinning threads
on a busy 2-core machine make a one-second run take twenty."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_accelerate_state() -> Iterator[None]:
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    yield


@pytest.fixture(autouse=True, scope="module")  # module: before the modules' own fixtures
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
