"""Checkpoints: exact round trips, atomic writes, corruption detected, nothing executed on load."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import random
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from bigbatch.app.checkpoint import (
    CheckpointError,
    flatten_state,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
    unflatten_state,
)
from bigbatch.errors import BigBatchError

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.int8, torch.uint8, torch.bool]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as raw bytes, in order (a fresh stride-1 copy: a one-element view
    can keep a stride of 2 through ``contiguous()``, and ``view(uint8)`` needs stride 1)."""
    flat = torch.empty(t.numel(), dtype=t.dtype)
    flat.copy_(t.reshape(-1))
    return flat.view(torch.uint8)


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Exact equality: same types all the way down, tensors bit for bit (NaN payloads included)."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.numel() == 0 or torch.equal(_bytes(a), _bytes(b)), where
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (
            a == b and math.copysign(1, a) == math.copysign(1, b)), f"{where}: {a} != {b}"
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert type(k) is type(next(k2 for k2 in b if k2 == k)), where
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    else:
        assert a == b, where


def roundtrip(obj: Any) -> Any:
    """Through the same serializations as a checkpoint, in memory: safetensors bytes and JSON."""
    tensors, tree = flatten_state(obj)
    text = json.dumps(tree, allow_nan=False)  # strict JSON: NaN would have to be tagged
    return unflatten_state(load(save(tensors)), json.loads(text))


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    n = math.prod(shape) * 2  # twice as many elements, so a strided view can be taken
    if dtype is torch.bool:
        flat = torch.randint(0, 2, (n,), generator=gen).bool()
    else:  # random bytes: every bit pattern, NaNs and infinities of float dtypes included
        size = torch.empty((), dtype=dtype).element_size()
        flat = torch.randint(0, 256, (n * size,), dtype=torch.uint8, generator=gen).view(dtype)
    if draw(st.booleans()) and shape:
        return flat[::2].reshape(shape)  # non-contiguous: every other element
    return flat[: n // 2].reshape(shape)


LEAVES = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
          | st.text(max_size=5) | tensors())
TREES = st.recursive(
    LEAVES,
    lambda kids: (st.lists(kids, max_size=3) | st.lists(kids, max_size=3).map(tuple)
                  | st.dictionaries(st.text(max_size=4) | st.integers(-5, 5), kids, max_size=3)),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(TREES)
@example(torch.tensor([0.0, 1.5, -3.8])[2::2])  # one element with stride 2 (found by hypothesis)
@example({"v": torch.arange(6.0)[::2], "e": torch.empty(0)})
def test_flatten_roundtrip_is_exact(obj: Any) -> None:
    assert_same(obj, roundtrip(obj))


def test_non_contiguous_and_shared_storage_tensors_save_and_load(tmp_path: Path) -> None:
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    state = {"base": base, "t": base.t(), "row": base[1], "col": base[:, 2], "same": [base, base]}
    loaded = load_checkpoint(save_checkpoint(tmp_path, "a", state))
    assert_same(state, loaded)
    assert loaded["same"][0].data_ptr() != loaded["same"][1].data_ptr()  # not aliased on load


def test_unsupported_types_name_their_place() -> None:
    cases = [(lambda: 0, "function"), (np.zeros(3), "ndarray"), ({1, 2}, "set"),
             (OrderedDict, "type"), (np.float64(1.0), "float64")]
    for bad, kind in cases:
        state = {"optimizer": {"state": {0: {"foo": bad}}}}
        with pytest.raises(CheckpointError, match=kind) as info:
            flatten_state(state)
        assert "state['optimizer']['state'][0]['foo']" in str(info.value)
    with pytest.raises(CheckpointError, match=r"state\[1\].*key True"):
        flatten_state([0, {True: 1}])
    assert issubclass(CheckpointError, BigBatchError)


def test_malformed_tree_is_refused() -> None:
    for tree in [{"tensor": "t9"}, {"float": "1.5"}, {"what": 1}, {"dict": [[1.5, 2]]}]:
        with pytest.raises(CheckpointError, match="malformed"):
            unflatten_state({}, tree)


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, n: int) -> None:
    for i in range(n):
        opt.zero_grad()
        model(torch.full((2, 3), float(i + 1))).square().sum().backward()
        opt.step()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, nesterov=True)])
def test_optimizer_and_scheduler_resume_bitwise(tmp_path: Path, make_opt: Any) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = make_opt(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    _steps(model, opt, sched, 3)
    saved = save_checkpoint(tmp_path, "c", {"model": model.state_dict(),
                                            "optimizer": opt.state_dict(),
                                            "scheduler": sched.state_dict()})
    state = load_checkpoint(saved)
    assert_same(state["optimizer"], opt.state_dict())
    assert_same(state["scheduler"], sched.state_dict())
    assert type(state["model"]) is OrderedDict
    model2 = torch.nn.Linear(3, 2)
    opt2 = make_opt(model2.parameters())
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1 / (s + 1))
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    _steps(model, opt, sched, 2)
    _steps(model2, opt2, sched2, 2)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)


def test_scaler_and_rng_states_roundtrip(tmp_path: Path) -> None:
    np_name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"scaler": torch.amp.GradScaler("cpu").state_dict(), "torch": torch.get_rng_state(),
             "python": random.getstate(),
             "numpy": [np_name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    loaded = load_checkpoint(save_checkpoint(tmp_path, "r", state))
    assert_same(state, loaded)
    assert len(loaded["python"][1]) == 625 and type(loaded["python"][1]) is tuple
    expected = (random.random(), torch.rand(3))
    random.setstate(loaded["python"])
    torch.set_rng_state(loaded["torch"])
    assert_same((random.random(), torch.rand(3)), expected)


def test_save_load_collision_and_bad_names(tmp_path: Path) -> None:
    state = {"w": torch.ones(2), "step": 7, "lr": 0.5}
    path = save_checkpoint(tmp_path / "ck", "step-1", state)
    assert path == tmp_path / "ck" / "step-1"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "state.json", "tensors.safetensors"]
    assert_same(load_checkpoint(path), state)
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path / "ck", "step-1", {"other": 1})
    assert_same(load_checkpoint(path), state)  # untouched
    for name in ["", ".hidden", "../x", "a/b"]:
        with pytest.raises(CheckpointError, match="single path component"):
            save_checkpoint(tmp_path / "ck", name, state)
    with pytest.raises(CheckpointError, match="cannot save.*state\\['f'\\]"):
        save_checkpoint(tmp_path / "ck", "step-2", {"f": print})
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["step-1"]  # no temp left behind


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_keep_prunes_oldest_and_stale_temps(tmp_path: Path) -> None:
    for i in range(5):
        save_checkpoint(tmp_path, f"step-{i:04d}", {"i": i}, keep=None)
    dead = tmp_path / f".tmp-step-0009-{_dead_pid()}-abcd"
    alive = tmp_path / f".tmp-step-0009-{os.getppid()}-abcd"  # another live process's write
    ours_old = tmp_path / f".tmp-step-0009-{os.getpid()}-abcd"  # same pid, earlier process
    for d in (dead, alive, ours_old):
        d.mkdir()
    save_checkpoint(tmp_path, "step-0005", {"i": 5}, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0003", "step-0004", "step-0005"]
    assert not dead.exists() and not ours_old.exists() and alive.exists()
    # Written out of order: the newest 2 by name stay, and so does the one just written.
    save_checkpoint(tmp_path, "step-0000", {"i": 0}, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000", "step-0004", "step-0005"]
    with pytest.raises(CheckpointError, match="keep=0"):
        save_checkpoint(tmp_path, "step-0006", {}, keep=0)


def _flip(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


CORRUPTIONS = {
    "truncated tensors": (lambda p: _truncate(p / "tensors.safetensors"),
                          "tensors.safetensors is .* bytes, the manifest says .*truncated"),
    "flipped tensor byte": (lambda p: _flip(p / "tensors.safetensors"),
                            "tensors.safetensors checksum mismatch"),
    "flipped state byte": (lambda p: _flip(p / "state.json"), "state.json checksum mismatch"),
    "no manifest": (lambda p: (p / "manifest.json").unlink(), "manifest.json missing"),
    "no state": (lambda p: (p / "state.json").unlink(), "state.json missing"),
    "garbled manifest": (lambda p: _flip(p / "manifest.json", 0), "manifest.json is not valid"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corruption_detected_and_latest_falls_back(tmp_path: Path, kind: str) -> None:
    corrupt, message = CORRUPTIONS[kind]
    good = save_checkpoint(tmp_path, "step-1", {"w": torch.arange(100.0), "n": 1})
    bad = save_checkpoint(tmp_path, "step-2", {"w": torch.arange(100.0) * 2, "n": 2})
    corrupt(bad)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(bad)
    assert str(info.value).startswith(f"checkpoint {bad}: ") and "\n" not in str(info.value)
    path, state, rejected = load_latest(tmp_path)
    assert path == good and state["n"] == 1
    assert [p for p, _ in rejected] == [bad] and rejected[0][1] in str(info.value)


def test_leftover_temp_is_ignored(tmp_path: Path) -> None:
    good = save_checkpoint(tmp_path, "step-1", {"n": 1})
    # What a writer killed before its rename leaves: a complete-looking copy under a temp name.
    stale = tmp_path / f".tmp-step-2-{_dead_pid()}-0123"
    stale.mkdir()
    for f in good.iterdir():
        (stale / f.name).write_bytes(f.read_bytes())
    assert list_checkpoints(tmp_path) == [good]
    assert load_latest(tmp_path) == (good, {"n": 1}, [])


def test_killed_mid_write_leaves_previous_checkpoint_usable(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, "step-1", {"n": 1})
    script = textwrap.dedent(f"""
        import os, signal, torch
        import bigbatch.app.checkpoint as c
        real = c._fsync
        def fsync_then_die(path):
            real(path)
            if path.name.startswith(".tmp-"):  # the temp dir is complete: die just before rename
                os.kill(os.getpid(), signal.SIGKILL)
        c._fsync = fsync_then_die
        c.save_checkpoint(c.Path({str(tmp_path)!r}), "step-2", {{"w": torch.ones(1000)}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-step-2-")]
    assert len(temps) == 1 and (temps[0] / "manifest.json").exists()
    assert load_latest(tmp_path)[:2] == (tmp_path / "step-1", {"n": 1})
    save_checkpoint(tmp_path, "step-3", {"n": 3}, keep=5)
    assert not temps[0].exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-3"]


class _Armed:
    """Unpickling this creates the marker file: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("target", ["tensors.safetensors", "state.json"])
def test_pickle_payload_is_refused_and_never_run(tmp_path: Path, target: str) -> None:
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Armed(probe))).close()
    assert probe.exists()  # the payload is live: unpickling it does run code
    marker = tmp_path / "marker"
    payload = pickle.dumps({"w": _Armed(marker)})
    path = save_checkpoint(tmp_path / "ck", "step-1", {"w": torch.ones(2)})
    (path / target).write_bytes(payload)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][target] = {"bytes": len(payload),
                                 "sha256": hashlib.sha256(payload).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))  # checksums now vouch for it
    with pytest.raises(CheckpointError, match=f"{target} is not (a )?valid"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="all 1 failed verification"):
        load_latest(tmp_path / "ck")
    assert not marker.exists()


def test_load_latest_empty_missing_and_all_bad(tmp_path: Path) -> None:
    assert load_latest(tmp_path / "missing") is None
    assert load_latest(tmp_path) is None
    (tmp_path / "logs").mkdir()  # an unrelated folder is not a checkpoint
    (tmp_path / ".tmp-step-1-1-ab").mkdir()
    assert load_latest(tmp_path) is None and list_checkpoints(tmp_path) == []
    for i in range(3):
        _flip(save_checkpoint(tmp_path, f"step-{i}", {"w": torch.zeros(10)}) / "state.json")
    with pytest.raises(CheckpointError,
                       match=r"all 3 failed verification, the newest \(step-2\) because "
                             "state.json checksum mismatch") as info:
        load_latest(tmp_path)
    assert "\n" not in str(info.value)

