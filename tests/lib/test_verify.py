"""verify and its helpers, in process (the CLI tests run the command itself)."""

from __future__ import annotations

import copy
import sys
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from reference import RTOL, TinyLM, lm_batch, lm_mean_loss, max_rel_diff

from bigbatch import Accumulator, BatchPlan, LossSum, token_cross_entropy
from bigbatch.app.config import ConfigError, TrainConfig
from bigbatch.app.verify import default_verify_inputs, load_factory
from bigbatch.verify import VerifyError, default_rtol, format_table, naive_loss, verify


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes())
    return path


def tiny(text: Path, **kw) -> TrainConfig:
    base = dict(n_layer=1, d_model=32, n_head=2, seq_len=32, global_batch=8, micro_batch=2,
                data=str(text), device="cpu", dtype="float64", warmup=0)
    return TrainConfig.of(**{**base, **kw})


def lm_loss(m, b):
    return token_cross_entropy(m(b["input_ids"]), b["labels"])


def sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


@pytest.fixture()
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


# --- naive_loss --------------------------------------------------------------------------------


def test_naive_loss_is_mean_of_micro_batch_means(float64: None) -> None:
    model = TinyLM()
    cycle = [lm_batch(4, lengths=lens) for lens in ([1, 0, 0, 2], [12] * 4, [3, 5, 7, 9])]
    ours = copy.deepcopy(model)
    stats = Accumulator(ours, sgd(ours)).step(cycle, naive_loss(lm_loss))
    hand = copy.deepcopy(model)  # the pre-2024 loop, written out
    opt = sgd(hand)
    means = []
    for b in cycle:
        loss = lm_mean_loss(hand, b)
        means.append(loss.item())
        (loss / len(cycle)).backward()
    opt.step()
    assert max_rel_diff(ours, hand) <= RTOL
    assert max_rel_diff(ours, model) > 1e-3  # a real step was taken
    assert stats.loss == pytest.approx(sum(means) / len(means), rel=RTOL)


def test_naive_loss_empty_micro_batch_is_zero_not_nan(float64: None) -> None:
    model = TinyLM()
    empty = lm_batch(2, lengths=[0, 0])

    def int_count(m, b):
        ls = lm_loss(m, b)
        return LossSum(ls.sum, int(ls.count))

    for fn in (lm_loss, int_count):  # an integer-tensor count (as lm_loss gives) and an int
        ls = naive_loss(fn)(model, empty)
        assert ls.count == 1 and float(ls.sum.detach()) == 0.0 and ls.sum.requires_grad


# --- verify on the default workload -------------------------------------------------------------


def test_verify_passes_in_float64_and_naive_fails(text: Path) -> None:
    config = tiny(text)
    model, batches, loss_fn, make_opt = default_verify_inputs(config, 2)
    plan = config.plan()
    counts = [[int((b["labels"] != -100).sum()) for b in plan.split(x)] for x in batches]
    assert all(len(set(c)) > 1 for c in counts)  # micro-batches really differ in token count
    ok = verify(model, batches, loss_fn, plan=plan, make_optimizer=make_opt, rtol=1e-10,
                clip=config.optim.clip_norm)
    assert ok.passed and ok.worst <= 1e-10 and len(ok.rows) == 2
    assert (ok.k, ok.micro_batch, ok.global_batch, ok.dtype) == (4, 2, 8, "float64")
    assert all(abs(r.cosine - 1) < 1e-12 and r.loss_diff < 1e-12 for r in ok.rows)
    assert all(r.grad_max_abs > 0 or r.grad_max_rel == 0 for r in ok.rows)
    table = format_table(ok)
    assert "PASS" in table and "K=4 micro-batches of 2" in table and "float64" in table
    assert len(table.splitlines()) == 2 + 2 + 1  # header, rule, 2 rows, verdict
    bad = verify(model, batches, loss_fn, plan=plan, make_optimizer=make_opt, rtol=1e-10,
                 clip=config.optim.clip_norm, normalization="naive")
    assert not bad.passed and bad.worst > 1e-3
    assert "FAIL" in format_table(bad) and "naive" in format_table(bad)
    # the starting model is untouched: both paths trained copies
    fresh, *_ = default_verify_inputs(config, 1)
    assert max_rel_diff(model, fresh) == 0.0


def test_verify_refuses_a_batch_that_does_not_fill_k_micro_batches(float64: None) -> None:
    model = TinyLM()
    plan = BatchPlan(global_batch=8, micro_batch=2, world_size=1)
    with pytest.raises(VerifyError, match=r"batch 1 has 4 rows but the plan takes 8 \(K=4"):
        verify(model, [lm_batch(4)], lm_loss, plan=plan, make_optimizer=sgd, rtol=1e-10)
    with pytest.raises(VerifyError, match="normalization must be 'exact' or 'naive'"):
        verify(model, [lm_batch(8)], lm_loss, plan=plan, make_optimizer=sgd, rtol=1e-10,
               normalization="mean")  # type: ignore[arg-type]


def test_default_rtol() -> None:
    assert default_rtol(torch.float64) == 1e-10
    assert default_rtol(torch.float32) == 1e-4
    with pytest.raises(VerifyError, match="use --dtype float32 or float64"):
        default_rtol(torch.bfloat16)


# --- user factories ------------------------------------------------------------------------------

FACTORY = """
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from bigbatch import LossSum
from mysetup_helper import HIDDEN


@dataclass
class Shape:  # a dataclass with string annotations needs the module in sys.modules
    hidden: int = HIDDEN


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, Shape().hidden), torch.nn.Tanh(),
                                torch.nn.Linear(Shape().hidden, 2)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randn(8, 2, dtype=torch.float64)
    mask = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1.0], dtype=torch.float64)[:, None]

    def loss_fn(m, b):  # mask 0 rows are padding: micro-batches hold 1, 0, 2, 2 real rows
        x, y, mask = b
        err = (F.mse_loss(m(x), y, reduction="none") * mask).sum()
        return LossSum(err, (mask.sum() * 2).long())

    return model, (x, y, mask), loss_fn

def broken():
    raise ValueError("no GPU here")

def wrong():
    return 42

def wrong_tuple():
    return 1, 2, 3

not_a_function = 3
"""


@pytest.fixture()
def factory_file(tmp_path: Path):
    path = tmp_path / "mysetup.py"
    path.write_text(FACTORY)
    (tmp_path / "mysetup_helper.py").write_text("HIDDEN = 8\n")
    (tmp_path / "badimport.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "crash.py").write_text("1 / 0\n")
    path_before, modules_before = list(sys.path), set(sys.modules)
    yield path
    for name in set(sys.modules) - modules_before:
        del sys.modules[name]
    sys.path[:] = path_before


def test_user_factory_by_path_and_by_module(factory_file: Path) -> None:
    path_before = list(sys.path)
    model, batch, loss_fn = load_factory(f"{factory_file}:make")
    assert sys.path == path_before  # the file's folder was on sys.path only while it loaded
    assert "mysetup" not in sys.modules  # registered under a private name, shadowing nothing
    plan = BatchPlan(global_batch=8, micro_batch=2, world_size=1)
    report = verify(model, [batch] * 3, loss_fn, plan=plan, make_optimizer=sgd, rtol=1e-10)
    assert report.passed and report.dtype == "float64"
    naive = verify(model, [batch] * 3, loss_fn, plan=plan, make_optimizer=sgd, rtol=1e-10,
                   normalization="naive")
    assert naive.worst > 1e-3  # uneven micro-batches: the naive recipe differs
    sys.path.insert(0, str(factory_file.parent))
    model2, _, _ = load_factory("mysetup:make")
    assert isinstance(model2, torch.nn.Sequential)
    assert max_rel_diff(model2, model) == 0.0


@pytest.mark.parametrize(("spec", "message"), [
    ("nocolon", "expected MODULE:FUNCTION or path/file.py:FUNCTION"),
    ("no_such_module_xyz:make",
     "no module named 'no_such_module_xyz'; check PYTHONPATH or give a file path"),
    ("/no/such/file.py:make", "no such file /no/such/file.py; check the path"),
    ("{d}/badimport.py:make", "raised ModuleNotFoundError: No module named "
     "'no_such_dependency_xyz'; install it"),
    ("{d}/crash.py:make", "importing .*crash.py raised ZeroDivisionError: division by zero"),
    ("{d}/mysetup.py:missing", "has no attribute 'missing'; check the function's name"),
    ("{d}/mysetup.py:not_a_function", "not_a_function is a int, not callable"),
    ("{d}/mysetup.py:broken", r"mysetup.py:broken raised ValueError: no GPU here"),
    ("{d}/mysetup.py:wrong", r"must return \(model, batch, loss_fn\) .* got int"),
    ("{d}/mysetup.py:wrong_tuple", r"got \(int, int, int\)"),
])
def test_load_factory_errors(factory_file: Path, spec: str, message: str) -> None:
    path_before = list(sys.path)
    with pytest.raises(ConfigError, match=message) as info:
        load_factory(spec.format(d=factory_file.parent))
    assert "\n" not in str(info.value) and str(info.value).startswith("--model ")
    err = info.value  # no chained traceback: the user's own error is in the one line
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert sys.path == path_before


# --- dropout and other randomness ----------------------------------------------------------------


class DropoutLM(TinyLM):
    """TinyLM with dropout 0.1 wherever torch.nn gives it a place (3 Dropout modules and the
    attention's float ``dropout`` per layer) and a Hugging Face-style config that holds one."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(attn_pdrop=0.1, n_layer=2)
        for m in self.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.1
            elif isinstance(m, torch.nn.MultiheadAttention):
                m.dropout = 0.1


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy with dropout off, written out for DropoutLM."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
    return ref


@pytest.mark.parametrize("micro", [2, 8])  # K = 4, and K = 1 (which failed as well)
def test_verify_switches_dropout_off_and_says_so(float64: None, micro: int) -> None:
    model = DropoutLM()
    batches = [lm_batch(8, lengths=[1, 0, 12, 3, 12, 12, 5, 7]), lm_batch(8)]
    plan = BatchPlan(global_batch=8, micro_batch=micro, world_size=1)
    report = verify(model, batches, lm_loss, plan=plan, make_optimizer=sgd, rtol=1e-10)
    assert report.passed and report.worst <= 1e-10
    assert report.dropout_off == ("6 Dropout modules (p=0.1)",
                                  "2× MultiheadAttention.dropout=0.1", "config attn_pdrop")
    lines = format_table(report).splitlines()
    said = [line for line in lines if "dropout" in line]
    assert len(said) == 1 and said[0].startswith("dropout switched off in both copies")
    assert lines[-1].startswith("PASS")
    # the reference loss is the dropout-free model's, computed independently
    expected = lm_mean_loss(no_dropout(model), batches[0]).item()
    assert report.rows[0].loss_full == pytest.approx(expected, rel=1e-12, abs=0)
    # the user's model is untouched: it still trains with dropout
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.1] * 6
    assert model.config.attn_pdrop == 0.1 and model.blocks.layers[0].self_attn.dropout == 0.1


def test_dropout_in_eval_mode_is_left_alone(float64: None) -> None:
    model = DropoutLM().eval()
    plan = BatchPlan(global_batch=8, micro_batch=2, world_size=1)
    report = verify(model, [lm_batch(8)], lm_loss, plan=plan, make_optimizer=sgd, rtol=1e-10)
    assert report.passed and report.dropout_off == ()
    assert "dropout" not in format_table(report)


class NoisyLM(TinyLM):
    """Randomness that is not dropout: noise added to the logits in training mode."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        return out + 0.1 * torch.randn_like(out) if self.training else out


def test_other_randomness_is_refused_not_a_bare_fail(float64: None) -> None:
    plan = BatchPlan(global_batch=8, micro_batch=2, world_size=1)
    model, batch = NoisyLM(), lm_batch(8)
    rng = torch.get_rng_state()
    with pytest.raises(VerifyError, match=r"the model's forward is random: .* make the forward "
                       "deterministic") as info:
        verify(model, [batch], lm_loss, plan=plan, make_optimizer=sgd, rtol=1e-10)
    assert "\n" not in str(info.value)
    assert torch.equal(torch.get_rng_state(), rng)  # the probe left the global RNG as it was


# --- precision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_verify_compares_under_autocast_at_a_stated_tolerance(precision: str) -> None:
    torch.manual_seed(0)
    model = TinyLM()  # float32, as bigbatch train keeps parameters under autocast
    batches = [lm_batch(8, lengths=[1, 0, 12, 12, 2, 1, 12, 12]), lm_batch(8)]
    plan = BatchPlan(global_batch=8, micro_batch=2, world_size=1)
    rtol = default_rtol(torch.float32, precision)  # type: ignore[arg-type]
    run = dict(plan=plan, make_optimizer=sgd, rtol=rtol, clip=1.0)
    fp32 = verify(model, batches, lm_loss, **run)
    amp = verify(model, batches, lm_loss, precision=precision, **run)  # type: ignore[arg-type]
    assert amp.precision == precision and amp.passed
    assert amp.worst > 10 * fp32.worst  # autocast really ran: its rounding shows
    table = format_table(amp)
    assert f"rtol {rtol:.0e} (float32 under {precision} autocast" in table.splitlines()[-1]
    naive = verify(model, batches, lm_loss, precision=precision, normalization="naive",
                   **run)  # type: ignore[arg-type]
    assert not naive.passed and naive.worst > 2 * rtol


def test_autocast_refuses_float64_and_unknown_precision(float64: None) -> None:
    plan = BatchPlan(global_batch=8, micro_batch=2, world_size=1)
    with pytest.raises(VerifyError, match="give --dtype float32"):
        verify(TinyLM(), [lm_batch(8)], lm_loss, plan=plan, make_optimizer=sgd, rtol=1e-2,
               precision="bf16")
    with pytest.raises(VerifyError, match="precision must be"):
        verify(TinyLM(), [lm_batch(8)], lm_loss, plan=plan, make_optimizer=sgd, rtol=1e-2,
               precision="fp8")  # type: ignore[arg-type]
    assert [default_rtol(torch.float32, p) for p in ("bf16", "fp16")] == [1e-1, 1e-2]
    with pytest.raises(VerifyError, match="use --dtype float32"):
        default_rtol(torch.float64, "bf16")
