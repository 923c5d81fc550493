"""Padding-free rows and the cost-model partition: invariants, and exactness against an
independent full batch (plain PyTorch: one padded forward, mean loss, one step)."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import RTOL, full_batch_train, lm_batch, lm_mean_loss, max_rel_diff

from bigbatch import (
    Accumulator,
    CostModel,
    LossSum,
    pack_batch,
    pack_rows,
    partition_by_cost,
    token_cross_entropy,
)
from bigbatch.app.models.gpt import GPT, GPTConfig
from bigbatch.packing import PackingError, pack_by_tokens
from bigbatch.partition import PRIOR, _fit, equal_row_partition, measure_cost
from bigbatch.rows import fill_rows, segment_ids

pytestmark = pytest.mark.usefixtures("float64")

SEQ, VOCAB = 12, 32


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=2, n_head=2, d_model=16))


def rows_loss(model, batch) -> LossSum:
    return token_cross_entropy(model(batch["input_ids"], batch["position_ids"]),
                               batch["labels"])


def padded_loss(model, batch) -> LossSum:
    return token_cross_entropy(model(batch["input_ids"]), batch["labels"])


def sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)


def adamw(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)


def run(model, make_opt, cycles, loss, clip=None) -> torch.nn.Module:
    model = copy.deepcopy(model)
    acc = Accumulator(model, make_opt(model), clip_grad_norm=clip)
    for cycle in cycles:
        acc.step(cycle, loss)
    return model


def cycles_of(n_steps: int = 3, n: int = 14) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [lm_batch(n, SEQ, VOCAB, generator=g) for _ in range(n_steps)]


# -- fill_rows / segment_ids / pack_rows invariants -----------------------------------------------


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(0, 20), max_size=40), extra=st.integers(0, 30))
def test_fill_rows_holds_every_sample_once_within_the_width(lengths: list[int],
                                                            extra: int) -> None:
    width = max(lengths + [1]) + extra
    rows = fill_rows(lengths, width)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(max(lengths[i], 1) for i in r) <= width for r in rows)
    # first fit: no sample could have gone into an earlier row when it was placed
    total = sum(max(v, 1) for v in lengths)
    assert len(rows) <= max(1, 2 * math.ceil(total / width)) or not lengths


def test_segment_ids() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]])
    assert segment_ids(pos).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0] * 8]


def test_pack_rows_keeps_every_real_token_once() -> None:
    batch = lm_batch(9, SEQ, VOCAB, lengths=[12, 1, 5, 7, 3, 0, 12, 4, 8],
                     generator=torch.Generator().manual_seed(0))
    micro = pack_rows(batch, 2 * SEQ)
    assert all(m["input_ids"].numel() <= 2 * SEQ for m in micro)
    assert set(micro[0]) == {"input_ids", "labels", "position_ids"}
    got = sorted(tuple(m["labels"][r][m["labels"][r] != -100].tolist())
                 for m in micro for r in range(len(m["labels"])))
    real = [batch["labels"][i][batch["labels"][i] != -100].tolist() for i in range(9)]
    assert sum(len(x) for x in got) == sum(len(x) for x in real)
    flat = sorted(t for x in got for t in x)
    assert flat == sorted(t for x in real for t in x)
    # rows are fuller than the padded batch: 9 samples in fewer rows
    assert sum(len(m["labels"]) for m in micro) < 9


def test_pack_rows_refuses_what_it_cannot_pack() -> None:
    batch = lm_batch(4, SEQ, VOCAB, generator=torch.Generator().manual_seed(0))
    with pytest.raises(PackingError, match="per-token tensor"):
        pack_rows({**batch, "label": torch.zeros(4)}, 24)
    with pytest.raises(PackingError, match="row width 12 is more than max_tokens 8"):
        pack_rows(batch, 8)
    with pytest.raises(PackingError, match="no 'labels' tensor"):
        pack_rows({"input_ids": batch["input_ids"]}, 24)
    with pytest.raises(PackingError, match="mode 'rowz' is not one of"):
        pack_batch(batch, 24, mode="rowz")
    assert len(pack_batch(batch, 24)) == len(pack_batch(batch, 24, mode="partition",
                                                         cost=PRIOR))  # the default
    with pytest.raises(PackingError, match="cost is used by mode='partition' only"):
        pack_batch(batch, 24, mode="rows", cost=CostModel(1.0, 1.0))


def test_gpt_position_ids_are_checked() -> None:
    model = gpt()
    ids = torch.zeros(2, 4, dtype=torch.int64)
    with pytest.raises(ValueError, match="position_ids must be an integer tensor of shape"):
        model(ids, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"position_ids must lie in \[0, 12\)"):
        model(ids, torch.full((2, 4), 12))


# -- padding-free rows are exact -----------------------------------------------------------------


def test_a_packed_sample_sees_only_itself() -> None:
    """Each sample's logits in a packed row are its logits alone (the mask and the positions)."""
    model = gpt().eval()
    batch = lm_batch(6, SEQ, VOCAB, lengths=[5, 3, 4, 2, 6, 1],
                     generator=torch.Generator().manual_seed(1))
    micro = pack_rows(batch, 4 * SEQ)
    assert len(micro) == 1 and micro[0]["input_ids"].shape[0] < 6
    with torch.no_grad():
        logits = model(micro[0]["input_ids"], micro[0]["position_ids"])
    for r in range(logits.shape[0]):
        seg, pos = segment_ids(micro[0]["position_ids"])[r], micro[0]["position_ids"][r]
        for s in seg.unique().tolist():
            cols = (seg == s).nonzero().flatten()
            with torch.no_grad():
                alone = model(micro[0]["input_ids"][r, cols][None])[0]
            assert pos[cols].tolist() == list(range(len(cols)))
            assert max_rel_diff_t(logits[r, cols], alone) <= RTOL


def max_rel_diff_t(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max()) if a.numel() else 0.0


@pytest.mark.parametrize("make_opt,clip", [(sgd, None), (adamw, 0.05)])
def test_padding_free_rows_equal_the_full_batch(make_opt, clip) -> None:
    model = gpt()
    cycles = cycles_of()
    truth = full_batch_train(model, make_opt, [[b] for b in cycles], lm_mean_loss, clip=clip)
    packed = [pack_batch(b, 2 * SEQ, mode="rows") for b in cycles]
    assert any(m["input_ids"].shape[0] < 14 for c in packed for m in c)
    got = run(model, make_opt, packed, rows_loss, clip)
    assert max_rel_diff(got, truth) <= RTOL
    assert max_rel_diff(truth, model) > 1e-3  # training moved the weights
    # the rule broken: the same rows, but attention crosses from one sample into the next
    leaky = run(model, make_opt, packed, padded_loss, clip)
    assert max_rel_diff(leaky, truth) > 1e4 * RTOL


def test_unshifted_labels_get_their_boundaries_masked() -> None:
    """labels == input_ids and the loss shifts (the transformers convention): each sample's first
    label is masked, else the previous sample's last token would predict it."""
    model = gpt()
    g = torch.Generator().manual_seed(2)
    cycles = []
    for _ in range(2):
        b = lm_batch(10, SEQ, VOCAB, generator=g)
        b["labels"] = torch.where(b["labels"] == -100, -100, b["input_ids"])
        cycles.append(b)

    def shifted_mean(m, batch):  # the reference: one padded forward, shift, mean
        logits = m(batch["input_ids"])[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                 batch["labels"][:, 1:].reshape(-1))

    def shifted_sum(m, batch):
        logits = m(batch["input_ids"], batch["position_ids"])[:, :-1]
        return token_cross_entropy(logits, batch["labels"][:, 1:])

    truth = full_batch_train(model, sgd, [[b] for b in cycles], shifted_mean)
    good = [pack_rows(b, 3 * SEQ, labels_shifted=False) for b in cycles]
    assert max_rel_diff(run(model, sgd, good, shifted_sum), truth) <= RTOL
    bad = [pack_rows(b, 3 * SEQ) for b in cycles]  # boundaries left in
    assert max_rel_diff(run(model, sgd, bad, shifted_sum), truth) > 1e4 * RTOL


# -- the cost-model partition --------------------------------------------------------------------


def brute_force(lengths: list[int], budget: int, cost: CostModel) -> float:
    """The cheapest partition into runs of the sorted order, over every set of cuts."""
    s = sorted((max(v, 1) for v in lengths), reverse=True)
    best = math.inf
    for cuts in itertools.product([False, True], repeat=max(len(s) - 1, 0)):
        bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [len(s)]
        groups = list(zip(bounds, bounds[1:]))
        if all((j - i) * s[i] <= budget for i, j in groups):
            best = min(best, sum(cost.time(j - i, s[i]) for i, j in groups))
    return best


def predicted(lengths: list[int], groups: list[torch.Tensor], cost: CostModel) -> float:
    return sum(cost.time(len(g), max(max(lengths[i] for i in g.tolist()), 1)) for g in groups)


@settings(max_examples=150, deadline=None)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=11),
       extra=st.integers(0, 80), a=st.floats(0, 1), b=st.floats(0, 1), c=st.floats(0, 0.1))
def test_partition_is_the_cheapest_run_partition(lengths, extra, a, b, c) -> None:
    if a == b == c == 0:
        a = 1.0
    cost = CostModel(a, b, c)
    budget = max(lengths + [1]) + extra
    groups = partition_by_cost(lengths, budget, cost)
    assert sorted(i for g in groups for i in g.tolist()) == list(range(len(lengths)))
    assert all(len(g) * max(max(lengths[i] for i in g.tolist()), 1) <= budget for g in groups)
    assert predicted(lengths, groups, cost) == pytest.approx(brute_force(lengths, budget, cost),
                                                             rel=1e-12, abs=1e-12)
    # never worse than the two baselines it contains
    greedy = pack_by_tokens(lengths, budget)
    assert predicted(lengths, groups, cost) <= predicted(lengths, greedy, cost) * (1 + 1e-12)
    for k in range(1, len(lengths) + 1):
        equal = equal_row_partition(lengths, k)
        if all(len(g) * max(max(lengths[i] for i in g.tolist()), 1) <= budget for g in equal):
            assert predicted(lengths, groups, cost) <= predicted(lengths, equal, cost) * (1 + 1e-12)


def test_partition_follows_the_cost() -> None:
    lengths = [100, 90, 10, 9, 8, 7]
    # launch cost dominates: as few groups as the budget allows
    assert len(partition_by_cost(lengths, 600, CostModel(1.0, 1e-9))) == 1
    # padding costs more than a launch: the long ones alone, the short ones together
    # ([100], [90]: 190 + 2·5 < 200 + 5; [10, 9, 8, 7]: 40 + 5 < 34 + 4·5)
    groups = partition_by_cost(lengths, 600, CostModel(5.0, 1.0))
    assert [g.tolist() for g in groups] == [[0], [1], [2, 3, 4, 5]]


def test_partition_is_exact_against_the_full_batch() -> None:
    model = gpt()
    cycles = cycles_of()
    truth = full_batch_train(model, adamw, [[b] for b in cycles], lm_mean_loss, clip=0.05)
    cost = CostModel(1e-3, 1e-6, 1e-8)
    parts = [pack_batch(b, 3 * SEQ, mode="partition", cost=cost) for b in cycles]
    assert any(len(c) > 1 for c in parts)
    assert max_rel_diff(run(model, adamw, parts, padded_loss, 0.05), truth) <= RTOL


def test_cost_model_refuses_bad_coefficients() -> None:
    with pytest.raises(PackingError, match="per_token is -1"):
        CostModel(1.0, -1)
    with pytest.raises(PackingError, match="all zeros"):
        CostModel(0, 0, 0)
    with pytest.raises(PackingError, match="cost must be a CostModel"):
        partition_by_cost([1, 2], 4, (1, 2, 3))  # type: ignore[arg-type]


def test_fit_recovers_known_coefficients() -> None:
    truth = CostModel(2e-3, 3e-7, 4e-10)
    shapes = [(r, w) for w in (512, 256, 128, 64) for r in (1, 4096 // w)]
    fitted = _fit([(r, w, truth.time(r, w)) for r, w in shapes])
    assert fitted.as_list() == pytest.approx(truth.as_list(), rel=1e-6)
    # a term the data do not support comes out 0, not negative
    flat = _fit([(r, w, 1e-3 + 1e-6 * r * w) for r, w in shapes])
    assert flat.per_token_sq == pytest.approx(0, abs=1e-15) and flat.per_micro > 0


def test_measure_cost_probes_the_model() -> None:
    model = gpt()

    def make(rows: int, width: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, VOCAB, (rows, width))
        return {"input_ids": ids, "labels": ids}

    cost = measure_cost(model, padded_loss, make, 4 * SEQ, SEQ, repeats=1)
    assert isinstance(cost, CostModel) and cost.time(4, SEQ) > 0
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradient
    with pytest.raises(PackingError, match="longest 99 must be an integer in"):
        measure_cost(model, padded_loss, make, 4 * SEQ, 99)


def test_the_masked_and_the_per_sample_attention_agree() -> None:
    """The built-in GPT attends per sample on the CPU and through one block-diagonal mask on
    CUDA; both give each sample its own causal attention."""
    from bigbatch.app.models.gpt import document_mask, document_spans

    model = gpt()
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 0, 0, 1, 2]])
    assert document_spans(pos) == [[(0, 3), (3, 2), (5, 4), (9, 1)], [(0, 6), (6, 1), (7, 3)]]
    x = torch.randn(2, 10, 16)
    block = model.blocks[0]
    with torch.no_grad():
        a, b = block(x, document_mask(pos)), block(x, document_spans(pos))
        alone = block(x[:1, 5:9])  # one sample by itself, plain causal attention
    assert max_rel_diff_t(a, b) <= RTOL
    assert max_rel_diff_t(b[:1, 5:9], alone) <= RTOL
    assert max_rel_diff_t(block(x, None).detach(), b) > 1e-3  # crossing attention differs


def test_padding_free_rows_under_activation_checkpointing(monkeypatch) -> None:
    """The per-sample spans travel through torch.utils.checkpoint: the recomputed blocks attend
    as the first pass did, and the gradient is the same."""
    import bigbatch.app.models.gpt as gpt_module

    calls = []
    real = gpt_module.checkpoint
    monkeypatch.setattr(gpt_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=VOCAB, seq_len=SEQ, n_layer=2, n_head=2, d_model=16))
    recomputed = copy.deepcopy(plain)
    object.__setattr__(recomputed, "config", GPTConfig(
        vocab_size=VOCAB, seq_len=SEQ, n_layer=2, n_head=2, d_model=16,
        checkpoint_activations=True))
    micro = pack_rows(cycles_of(1)[0], 3 * SEQ)[0]
    for m in (plain, recomputed):
        rows_loss(m, micro).sum.backward()
    assert len(calls) == 2  # one per block, in the recomputed model only
    for a, b in zip(plain.parameters(), recomputed.parameters()):
        assert max_rel_diff_t(b.grad, a.grad) <= RTOL
