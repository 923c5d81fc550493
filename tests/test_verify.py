"""verify, compare and their helpers (in process; the CLI tests run the commands)."""

from __future__ import annotations

import copy
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from reference import RTOL, TinyLM, lm_batch, lm_mean_loss, max_rel_diff

from bigbatch import Accumulator, BatchPlan, token_cross_entropy
from bigbatch.compare import compare, format_compare
from bigbatch.config import ConfigError, TrainConfig
from bigbatch.data import vary_lengths
from bigbatch.verify import default_verify_inputs, format_table, load_factory, naive_loss, verify


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes())
    return path


def tiny(text: Path, **kw) -> TrainConfig:
    base = dict(n_layer=1, d_model=32, n_head=2, seq_len=32, global_batch=8, micro_batch=2,
                data=str(text), device="cpu", dtype="float64", warmup=0)
    return TrainConfig(**{**base, **kw})


def lm_loss(m, b):
    return token_cross_entropy(m(b["input_ids"]), b["labels"])


def test_vary_lengths_is_deterministic_and_only_masks_labels() -> None:
    batch = lm_batch(16, seq=20, lengths=[20] * 16)
    a, b = vary_lengths(batch, seed=3, step=5), vary_lengths(batch, seed=3, step=5)
    other = vary_lengths(batch, seed=3, step=6)
    assert torch.equal(a["labels"], b["labels"]) and not torch.equal(a["labels"], other["labels"])
    assert torch.equal(a["input_ids"], batch["input_ids"])
    kept = a["labels"] != -100
    assert torch.equal(a["labels"][kept], batch["labels"][kept])
    lengths = kept.sum(1)
    assert lengths.min() >= 1 and lengths.max() <= 20 and len(set(lengths.tolist())) > 3
    assert (kept.int().diff(dim=1) <= 0).all()  # a prefix is kept, the rest is padding
    assert (batch["labels"] != -100).all()  # the input batch was not modified


def test_naive_loss_is_mean_of_micro_batch_means() -> None:
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = TinyLM()
        cycle = [lm_batch(4, lengths=lens) for lens in ([1, 0, 0, 2], [12] * 4, [3, 5, 7, 9])]
        ours = copy.deepcopy(model)
        Accumulator(ours, torch.optim.SGD(ours.parameters(), lr=0.1)).step(cycle,
                                                                           naive_loss(lm_loss))
        hand = copy.deepcopy(model)
        opt = torch.optim.SGD(hand.parameters(), lr=0.1)
        for b in cycle:
            (lm_mean_loss(hand, b) / len(cycle)).backward()
        opt.step()
        assert max_rel_diff(ours, hand) <= RTOL
    finally:
        torch.set_default_dtype(torch.float32)


def test_verify_passes_in_float64_and_naive_fails(text: Path) -> None:
    config = tiny(text)
    model, batches, loss_fn, make_opt = default_verify_inputs(config, 2)
    plan = config.plan()
    ok = verify(model, batches, loss_fn, plan=plan, make_optimizer=make_opt, rtol=1e-10)
    assert ok.passed and ok.worst <= 1e-10 and len(ok.rows) == 2
    assert all(abs(r.cosine - 1) < 1e-12 for r in ok.rows)
    assert "PASS" in format_table(ok)
    bad = verify(model, batches, loss_fn, plan=plan, make_optimizer=make_opt, rtol=1e-10,
                 normalization="naive")
    assert not bad.passed and bad.worst > 1e-3 and "FAIL" in format_table(bad)


FACTORY = """
import torch
import torch.nn.functional as F
from bigbatch import LossSum

def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    batch = (torch.randn(8, 4), torch.randn(8, 2))
    def loss_fn(m, b):
        return LossSum(F.mse_loss(m(b[0]), b[1], reduction="sum"), b[1].numel())
    return model, batch, loss_fn

def broken():
    raise ValueError("no GPU here")

def wrong():
    return 42

not_a_function = 3
"""


@pytest.fixture()
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "mysetup.py"
    path.write_text(FACTORY)
    return path


def test_user_factory_by_path_and_by_module(factory_file: Path) -> None:
    model, batch, loss_fn = load_factory(f"{factory_file}:make")
    model = model.double()
    batch = tuple(t.double() for t in batch)
    plan = BatchPlan(global_batch=8, micro_batch=2, world_size=1)

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    report = verify(model, [batch] * 3, loss_fn, plan=plan, make_optimizer=sgd, rtol=1e-10)
    assert report.passed
    sys.path.insert(0, str(factory_file.parent))
    try:
        model2, _, _ = load_factory("mysetup:make")
        assert isinstance(model2, torch.nn.Sequential)
    finally:
        sys.path.remove(str(factory_file.parent))
        sys.modules.pop("mysetup", None)


@pytest.mark.parametrize(("spec", "message"), [
    ("nocolon", "expected MODULE:FUNCTION"),
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'; check PYTHONPATH"),
    ("/no/such/file.py:make", "no such file"),
    ("{f}:missing", "has no attribute 'missing'"),
    ("{f}:not_a_function", "not_a_function is not callable"),
    ("{f}:broken", "raised ValueError: no GPU here"),
    ("{f}:wrong", r"must return \(model, batch, loss_fn\), got int"),
])
def test_load_factory_errors(factory_file: Path, spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_factory(spec.format(f=factory_file))


def test_compare_three_runs(text: Path, tmp_path: Path) -> None:
    config = tiny(text, global_batch=8, micro_batch=2)
    png = tmp_path / "c.png"
    result = compare(config, steps=4, accum_steps=4, out_png=png, log=lambda line: None)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(len(v) == 4 for v in result.losses.values())
    assert result.distance["full batch"] == 0.0
    assert result.distance["bigbatch"] < 1e-9  # float64: the same weights
    assert result.distance["naive"] > 1e-3  # the naive recipe drifted
    assert "| naive | 4 |" in format_compare(result)
