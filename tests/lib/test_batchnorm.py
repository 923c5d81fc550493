"""BatchNorm: pooled running statistics against full-batch BatchNorm, conversion and freezing."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference import RTOL, concat, full_batch_train, max_rel_diff
from torch import nn

import bigbatch
from bigbatch import Accumulator, BatchPlan, FrozenBatchNorm, LossSum, PooledBatchNorm
from bigbatch.app.cli import main
from bigbatch.app.config import ConfigError, TrainConfig
from bigbatch.app.workload import apply_batchnorm_option, build_model
from bigbatch.batchnorm import group_count

BN = nn.modules.batchnorm._BatchNorm


pytestmark = pytest.mark.usefixtures("float64")


class Branches(nn.Module):
    """BatchNorm 1d/2d/3d side by side, none downstream of another, so each receives the same
    inputs with and without accumulation and its running statistics can be compared."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 4)
        self.bn1 = nn.BatchNorm1d(4)  # (N, C), affine, momentum 0.1
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn2 = nn.BatchNorm2d(3, affine=False, momentum=None)  # cumulative average
        self.bn3 = nn.BatchNorm3d(2, momentum=0.3)
        self.bn_seq = nn.BatchNorm1d(3)  # (N, C, L)
        self.bn_off = nn.BatchNorm1d(4, track_running_stats=False)  # nothing to pool
        self.head = nn.Linear(4 + 3 + 2 + 3 + 4, 2)
        for m in self.modules():  # start from statistics that are not the defaults
            if isinstance(m, BN) and m.track_running_stats:
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(3)

    def forward(self, batch):
        a, b, c, d = batch
        feats = [self.bn1(self.lin(a)), self.bn2(self.conv(b)).mean((2, 3)),
                 self.bn3(c).mean((2, 3, 4)), self.bn_seq(d).mean(2), self.bn_off(self.lin(a))]
        return self.head(torch.cat(feats, 1))


def branch_batch(n: int, shift: float = 0.0):
    """Inputs shifted by ``shift``: micro-batches with different means (a between term)."""
    return (torch.randn(n, 5) + shift, torch.randn(n, 2, 6, 6) + shift,
            torch.randn(n, 2, 3, 4, 4) * (1 + shift) + shift, torch.randn(n, 3, 7) - shift)


def uneven_cycle(sizes=(3, 5, 8, 2)):
    return [branch_batch(n, 0.5 * i) for i, n in enumerate(sizes)]


def out_loss(model, batch) -> LossSum:
    out = model(batch)
    return LossSum(out.square().sum(), out.shape[0])


def out_mean(model, batch) -> torch.Tensor:
    return model(batch).square().sum(1).mean()


def sgd(m):
    return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)


def tracked(model) -> list[torch.Tensor]:
    """Every running mean and variance, in module order."""
    return [t for m in model.modules() if isinstance(m, BN) and m.track_running_stats
            for t in (m.running_mean, m.running_var)]


def counts(model) -> list[int]:
    return [int(m.num_batches_tracked) for m in model.modules()
            if isinstance(m, BN) and m.track_running_stats]


def full_batch_forward(model, cycles):
    """A copy after one full-batch training-mode forward per cycle (where BatchNorm updates)."""
    model = copy.deepcopy(model)
    for cycle in cycles:
        model(concat(cycle))
    return model


# -- pooled ----------------------------------------------------------------------------------


def test_pooled_equals_full_batch_after_one_step_and_naive_differs() -> None:
    model = Branches()
    cycle = uneven_cycle()
    truth = full_batch_train(model, sgd, [cycle], out_mean)
    got = copy.deepcopy(model)
    Accumulator(got, sgd(got), batchnorm="pooled").step(cycle, out_loss)
    assert max_rel_diff(tracked(got), tracked(truth)) <= RTOL
    assert counts(got) == counts(truth) == [4, 4, 4, 4]
    assert max_rel_diff(tracked(got), tracked(model)) > 1e-2  # the statistics did move

    naive = copy.deepcopy(model)  # BatchNorm left alone: one momentum update per micro-batch
    Accumulator(naive, sgd(naive), batchnorm="ignore").step(cycle, out_loss)
    assert max_rel_diff(tracked(naive), tracked(truth)) > 1e-3
    assert counts(naive) == [7, 7, 7, 7]


def test_dropping_the_between_micro_batch_term_underestimates_the_variance() -> None:
    """AccumBN's pooling (mean of the micro-batch variances) is not the full-batch variance."""
    model = Branches()
    start = model.bn1.running_var.clone()
    cycle = uneven_cycle()
    with torch.no_grad():
        feats = [model.lin(b[0]) for b in cycle]
    n = torch.tensor([float(f.shape[0]) for f in feats])
    within = sum(f.var(0, correction=0) * k for f, k in zip(feats, n)) / n.sum()
    full = torch.cat(feats).var(0, correction=0)
    pool = PooledBatchNorm(model)
    for b in cycle:
        model(b)
    pool.step()
    m, f = model.bn1, 0.1
    want = (1 - f) * start + f * full * n.sum() / (n.sum() - 1)
    assert max_rel_diff([m.running_var], [want]) <= RTOL
    assert (full > within).all()  # the between term only adds ...
    accum_bn = (1 - f) * start + f * within * n.sum() / (n.sum() - 1)
    assert max_rel_diff([accum_bn], [want]) > 1e-2  # ... and dropping it shows


def test_pooled_over_several_steps_with_cumulative_average() -> None:
    model = Branches()
    for p in model.parameters():
        p.requires_grad_(False)  # fixed weights: the inputs of every layer match full batch
    cycles = [uneven_cycle(sizes) for sizes in [(3, 5), (4, 4, 4), (2, 9, 3, 6)]]
    truth = full_batch_forward(model, cycles)
    pool = PooledBatchNorm(model)
    assert pool.layers == ["bn1", "bn2", "bn3", "bn_seq"]
    for cycle in cycles:
        for micro in cycle:
            model(micro)
        assert pool.pending
        assert pool.step() == 4
    assert max_rel_diff(tracked(model), tracked(truth)) <= RTOL
    assert counts(model) == [6, 6, 6, 6]
    pool.remove()  # plain BatchNorm again: the next forward updates as usual
    before = [t.clone() for t in tracked(model)]
    model(cycles[0][0])
    assert max_rel_diff(tracked(model), before) > 1e-3


def test_stacked_layers_pool_the_inputs_they_received() -> None:
    """Downstream of a BatchNorm the inputs differ from full batch (micro-batch normalization
    upstream); the pooled statistics are exact for the inputs the layer did receive."""
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 4),
                          nn.BatchNorm1d(4))
    cycle = [torch.randn(n, 5) + i for i, n in enumerate((4, 6, 3))]
    truth = full_batch_forward(model, [cycle])
    second = copy.deepcopy(model[4])
    seen: list[torch.Tensor] = []
    model[4].register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    pool = PooledBatchNorm(model)
    for micro in cycle:
        model(micro)
    pool.step()
    assert max_rel_diff(tracked(model)[:2], tracked(truth)[:2]) <= RTOL  # first layer: exact
    assert max_rel_diff(tracked(model)[2:], tracked(truth)[2:]) > 1e-6  # second: other inputs
    second(torch.cat(seen))  # one full-batch update on the inputs the second layer received
    assert max_rel_diff(tracked(model)[2:], tracked(second)) <= RTOL


def test_running_statistics_hold_still_during_the_cycle_and_backward_works() -> None:
    model = Branches()
    acc = Accumulator(model, sgd(model), batchnorm="pooled")
    start = [t.clone() for t in tracked(model)]
    originals = [id(t) for t in tracked(model)]
    cycle = uneven_cycle()
    for micro in cycle[:3]:
        acc.accumulate(micro, out_loss)
    assert max_rel_diff(tracked(model), start) == 0.0 and counts(model) == [3, 3, 3, 3]
    assert [id(t) for t in tracked(model)] == originals  # the buffers themselves, not copies
    acc.accumulate(cycle[3], out_loss)
    assert not acc.finish().skipped and counts(model) == [4, 4, 4, 4]


def test_skipped_step_leaves_running_statistics_and_the_next_step_is_exact() -> None:
    model = Branches()
    bad, good = uneven_cycle(), uneven_cycle()
    truth = full_batch_forward(model, [good])  # (copied before the hooks go on)
    acc = Accumulator(model, sgd(model), batchnorm="pooled")
    start = [t.clone() for t in tracked(model)]
    bad[1] = tuple(t * float("inf") for t in bad[1])  # non-finite loss: the step is skipped
    stats = acc.step(bad, out_loss)
    assert stats.skipped and stats.skip_reason == "non-finite loss"
    assert max_rel_diff(tracked(model), start) == 0.0 and counts(model) == [3, 3, 3, 3]
    acc.step(good, out_loss)
    assert max_rel_diff(tracked(model), tracked(truth)) <= RTOL
    assert counts(model) == [4, 4, 4, 4]


def test_exception_mid_cycle_discards_the_pooled_statistics() -> None:
    model = Branches()
    cycle, good = uneven_cycle(), uneven_cycle()
    truth = full_batch_forward(model, [good])
    acc = Accumulator(model, sgd(model), batchnorm="pooled")
    start = [t.clone() for t in tracked(model)]
    originals = [id(t) for t in tracked(model)]
    cycle[2] = (cycle[2][0], cycle[2][1], cycle[2][2][:, :, 0], cycle[2][3])  # BatchNorm3d raises
    with pytest.raises(ValueError, match="expected 5D input"):
        acc.step(cycle, out_loss)
    assert [id(t) for t in tracked(model)] == originals  # no scratch copy left in place
    assert max_rel_diff(tracked(model), start) == 0.0 and counts(model) == [3, 3, 3, 3]
    acc.step(good, out_loss)
    assert max_rel_diff(tracked(model), tracked(truth)) <= RTOL


def test_eval_mode_layers_are_left_alone() -> None:
    model = Branches()
    model.bn3.eval()
    cycle = uneven_cycle()
    truth = full_batch_forward(model, [cycle])
    Accumulator(model, sgd(model), batchnorm="pooled").step(cycle, out_loss)
    assert counts(model) == [4, 4, 3, 4]
    assert max_rel_diff(tracked(model), tracked(truth)) <= RTOL


def test_pooled_state_dict_mid_cycle_resumes_exactly() -> None:
    model = Branches()
    cycle = uneven_cycle()
    truth = full_batch_forward(model, [cycle])
    m1 = copy.deepcopy(model)
    acc1 = Accumulator(m1, sgd(m1), batchnorm="pooled")
    for micro in cycle[:2]:
        acc1.accumulate(micro, out_loss)
    state, weights = copy.deepcopy(acc1.state_dict()), copy.deepcopy(m1.state_dict())
    assert set(state["features"]["batchnorm"]) == {"bn1", "bn2", "bn3", "bn_seq"}
    m2 = copy.deepcopy(model)
    m2.load_state_dict(weights)
    acc2 = Accumulator(m2, sgd(m2), batchnorm="pooled")
    acc2.load_state_dict(state)
    for micro in cycle[2:]:
        acc2.accumulate(micro, out_loss)
    acc2.finish()
    assert max_rel_diff(tracked(m2), tracked(truth)) <= RTOL
    with pytest.raises(bigbatch.BigBatchError, match="unknown layers nope"):
        PooledBatchNorm(m2).load_state_dict({"nope": {}})


def test_sync_batchnorm_is_refused_by_name() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4))
    with pytest.raises(bigbatch.BigBatchError, match=r"SyncBatchNorm layers \(1\)"):
        PooledBatchNorm(model)


def test_batchnorm_argument_and_warnings() -> None:
    model = Branches()
    with pytest.raises(bigbatch.BigBatchError, match="batchnorm must be 'warn', 'pooled' or "):
        Accumulator(model, sgd(model), batchnorm="pool")  # type: ignore[arg-type]
    with pytest.warns(bigbatch.BatchNormWarning, match="bn1, bn2, bn3, bn_seq, bn_off"):
        Accumulator(model, sgd(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Accumulator(model, sgd(model), batchnorm="pooled")
        Accumulator(model, sgd(model), batchnorm="ignore")
        converted = convert_cnn()
        Accumulator(converted, sgd(converted))  # converted: nothing to warn about


# -- convert and freeze ------------------------------------------------------------------------


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False)
        self.fc, self.bn3 = nn.Linear(6, 3), nn.BatchNorm1d(3)
        for m in self.modules():
            if isinstance(m, BN):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    nn.init.normal_(m.weight)
                    nn.init.normal_(m.bias)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h))).mean((2, 3))
        return self.bn3(self.fc(h))


def convert_cnn() -> nn.Module:
    torch.manual_seed(1)
    return bigbatch.convert_batchnorm(CNN())


def cnn_cycles(k: int = 4, steps: int = 3):
    plan = BatchPlan(global_batch=16, accum_steps=k, world_size=1)
    return [plan.split((torch.randn(16, 1, 5, 5), torch.randn(16, 3))) for _ in range(steps)]


def cnn_loss(model, batch) -> LossSum:
    x, y = batch
    return LossSum(F.mse_loss(model(x), y, reduction="sum"), y.numel())


def cnn_mean(model, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def train(model, cycles, **kwargs):
    model = copy.deepcopy(model)
    acc = Accumulator(model, sgd(model), **kwargs)
    for cycle in cycles:
        assert not acc.step(cycle, cnn_loss).skipped
    return model


@pytest.mark.parametrize(("to", "groups"), [("group", [8, 3, 1]), ("layer", [1, 1, 1])])
def test_group_conversion_is_trainable_and_accumulation_is_exact_again(to, groups) -> None:
    bn_model = CNN()
    model = bigbatch.convert_batchnorm(copy.deepcopy(bn_model), to=to)
    assert not any(isinstance(m, BN) for m in model.modules())
    norms = [model.bn1, model.bn2, model.bn3]
    assert all(type(m) is nn.GroupNorm for m in norms)
    assert [m.num_groups for m in norms] == groups
    assert [m.affine for m in norms] == [True, False, True]
    assert torch.equal(model.bn1.weight, bn_model.bn1.weight)
    assert torch.equal(model.bn3.bias, bn_model.bn3.bias)
    assert model.bn1.eps == bn_model.bn1.eps and model.bn1.weight.dtype == torch.float64
    cycles = cnn_cycles()
    assert torch.isfinite(model(cycles[0][0][0])).all()

    got = train(model, cycles)
    assert max_rel_diff(got, full_batch_train(model, sgd, cycles, cnn_mean)) <= RTOL
    assert max_rel_diff([got.bn1.weight, got.bn3.bias], [model.bn1.weight, model.bn3.bias]) > 1e-3
    assert all(p.requires_grad for p in got.parameters())
    # the same model with its BatchNorm layers is not exact under accumulation
    with pytest.warns(bigbatch.BatchNormWarning):
        naive = train(bn_model, cycles)
    assert max_rel_diff(naive, full_batch_train(bn_model, sgd, cycles, cnn_mean)) > 1e-3


def test_group_count_and_groups_argument() -> None:
    assert [group_count(c) for c in (1, 2, 3, 4, 6, 16, 48, 64, 96, 256, 7)] == \
        [1, 1, 1, 2, 3, 8, 24, 32, 32, 32, 1]
    model = bigbatch.convert_batchnorm(nn.Sequential(nn.BatchNorm2d(12)), groups=4)
    assert model[0].num_groups == 4
    with pytest.raises(bigbatch.BigBatchError, match="BatchNorm layer 1 has 6 channels, which 4"):
        bigbatch.convert_batchnorm(nn.Sequential(nn.BatchNorm2d(12), nn.BatchNorm2d(6)), groups=4)
    with pytest.raises(bigbatch.BigBatchError, match="use 'group', 'layer' or 'freeze'"):
        bigbatch.convert_batchnorm(nn.BatchNorm2d(4), to="instance")  # type: ignore[arg-type]


def test_convert_keeps_sharing_and_converts_a_bare_layer() -> None:
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    bigbatch.convert_batchnorm(model)
    assert model[1] is model[3] and isinstance(model[1], nn.GroupNorm)
    assert isinstance(bigbatch.convert_batchnorm(nn.BatchNorm2d(8), to="layer"), nn.GroupNorm)


def test_freeze_keeps_running_statistics_and_trains_the_affine_parameters() -> None:
    bn_model = CNN()
    model = bigbatch.convert_batchnorm(copy.deepcopy(bn_model), to="freeze")
    assert all(isinstance(m, FrozenBatchNorm) for m in (model.bn1, model.bn2, model.bn3))
    assert not any(isinstance(m, BN) for m in model.modules())
    x = cnn_cycles()[0][0][0]
    with torch.no_grad():
        assert max_rel_diff([model.train()(x)], [bn_model.eval()(x)]) <= RTOL  # eval-mode output
    stats = [t.clone() for t in model.buffers()]
    cycles = cnn_cycles()
    got = train(model, cycles)  # in training mode
    assert got.training and all(torch.equal(a, b) for a, b in zip(got.buffers(), stats))
    assert max_rel_diff([got.bn1.weight, got.bn3.bias], [model.bn1.weight, model.bn3.bias]) > 1e-3
    assert max_rel_diff(got, full_batch_train(model, sgd, cycles, cnn_mean)) <= RTOL
    reloaded = bigbatch.convert_batchnorm(CNN(), to="freeze")
    reloaded.load_state_dict(bn_model.state_dict())  # BatchNorm checkpoints load
    with pytest.raises(bigbatch.BigBatchError, match="cannot freeze BatchNorm layer 0: it keeps"):
        bigbatch.convert_batchnorm(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)),
                                   to="freeze")


# -- configuration and command line -----------------------------------------------------------


def test_batchnorm_option() -> None:
    assert TrainConfig.of().model.batchnorm == "warn"
    with pytest.raises(ConfigError, match="--batchnorm must be one of warn, convert, freeze"):
        TrainConfig.of(batchnorm="off")
    with pytest.raises(ConfigError, match=r"--batchnorm error: the model has BatchNorm layers "
                       r"\(bn1, bn2, bn3\).*use --batchnorm convert, freeze or pooled"):
        apply_batchnorm_option(CNN(), "error")
    assert isinstance(apply_batchnorm_option(CNN(), "convert").bn1, nn.GroupNorm)
    assert isinstance(apply_batchnorm_option(CNN(), "freeze").bn1, FrozenBatchNorm)
    assert isinstance(apply_batchnorm_option(CNN(), "pooled").bn1, nn.BatchNorm2d)
    config = TrainConfig.of(batchnorm="error", n_layer=1, d_model=16, n_head=2, seq_len=8)
    build_model(config, torch.device("cpu"))  # the default GPT has no BatchNorm: no error


FACTORY = """
import torch
from bigbatch import LossSum


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 2)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)

    def loss_fn(m, b):
        return LossSum(torch.nn.functional.mse_loss(m(b[0]), b[1], reduction="sum"), b[1].numel())

    return model, (x, y), loss_fn
"""


@pytest.mark.parametrize(("option", "status", "says"), [
    ("error", 2, "bigbatch: error: --batchnorm error: the model has BatchNorm layers (1)"),
    ("warn", 1, "FAIL"),  # micro-batch statistics: not the full-batch step
    ("convert", 0, "PASS"),
    ("freeze", 0, "PASS"),
])
def test_verify_respects_batchnorm_option(tmp_path: Path, capsys, option, status, says) -> None:
    path = tmp_path / "bnsetup.py"
    path.write_text(FACTORY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bigbatch.BatchNormWarning)
        code = main(["verify", "--model", f"{path}:make", "--dtype", "float64",
                     "--global-batch", "8", "--micro-batch", "2", "--batchnorm", option])
    out, err = capsys.readouterr()
    assert code == status
    assert says in (err if status == 2 else out)
    if status == 2:
        assert err.count("\n") == 1
