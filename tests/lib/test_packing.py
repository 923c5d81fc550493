"""Token-budget packing: invariants, trimming, exactness against the full batch."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import RTOL, TinyLM, full_batch_train, lm_batch, lm_mean_loss, max_rel_diff

from bigbatch import Accumulator, BatchPlan, BigBatchError, LossSum, token_cross_entropy
from bigbatch.app.data import (
    TokenWindows,
    global_batches,
    packed_micro_batches,
    split_definitions,
    stdlib_definitions,
)
from bigbatch.app.models.gpt import GPT, GPTConfig
from bigbatch.loss import IGNORE_INDEX
from bigbatch.packing import (
    PackingError,
    label_lengths,
    pack_batch,
    pack_by_tokens,
    pad_micro_batches,
    trim_padding,
)

pytestmark = pytest.mark.usefixtures("float64")


def cost(lengths: list[int], group: torch.Tensor) -> int:
    return len(group) * max(max(lengths[i] for i in group.tolist()), 1)


# -- pack_by_tokens ------------------------------------------------------------------------------


def check_packing(lengths: list[int], budget: int) -> list[torch.Tensor]:
    groups = pack_by_tokens(lengths, budget)
    flat = [i for g in groups for i in g.tolist()]
    assert sorted(flat) == list(range(len(lengths)))  # every sample exactly once
    assert all(g.dtype == torch.int64 and g.dim() == 1 and len(g) for g in groups)
    assert all(cost(lengths, g) <= budget for g in groups)
    # longest first, and ties in batch order: the concatenation is the stable sort
    assert flat == sorted(range(len(lengths)), key=lambda i: -lengths[i])
    # greedy: no group could have taken the next group's first sample
    for g, nxt in zip(groups, groups[1:]):
        width = max(lengths[int(g[0])], 1)
        assert (len(g) + 1) * width > budget
        assert lengths[int(nxt[0])] <= lengths[int(g[-1])]
    return groups


def fewest_runs(lengths: list[int], budget: int) -> int:
    """Fewest groups over all partitions of the sorted order into runs (dynamic programming)."""
    s = sorted(lengths, reverse=True)
    best = [0] + [len(s) + 1] * len(s)  # best[j]: groups for the first j sorted samples
    for j in range(1, len(s) + 1):
        for i in range(j):
            if (j - i) * max(s[i], 1) <= budget:
                best[j] = min(best[j], best[i] + 1)
    return best[-1]


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(0, 64), max_size=60), extra=st.integers(0, 300))
def test_packing_invariants(lengths: list[int], extra: int) -> None:
    budget = max(lengths + [1]) + extra
    groups = check_packing(lengths, budget)
    assert len(groups) == fewest_runs(lengths, budget)
    again = pack_by_tokens(torch.tensor(lengths, dtype=torch.int64), budget)  # tensor input too
    assert [g.tolist() for g in again] == [g.tolist() for g in groups]  # deterministic


def test_packing_example() -> None:
    lengths = [3, 5, 1, 5, 2, 0, 7]
    groups = check_packing(lengths, 10)
    assert [g.tolist() for g in groups] == [[6], [1, 3], [0, 4, 2], [5]]


def test_equal_lengths_keep_batch_order() -> None:
    groups = check_packing([4] * 10, 12)
    assert [g.tolist() for g in groups] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_budget_of_one_sample_each_and_empty() -> None:
    assert [g.tolist() for g in pack_by_tokens([2, 3, 1], 3)] == [[1], [0], [2]]
    assert pack_by_tokens([], 8) == []


def test_short_samples_share_long_ones_stand_alone() -> None:
    lengths = [128] * 4 + [8] * 64  # a run of long sequences among short ones
    groups = check_packing(lengths, 256)
    assert [len(g) for g in groups] == [2, 2, 32, 32]


@pytest.mark.parametrize("budget", [0, -3, True, 2.5, "8", None])
def test_bad_budget(budget: object) -> None:
    with pytest.raises(PackingError, match="max_tokens must be a positive integer") as e:
        pack_by_tokens([1, 2], budget)  # type: ignore[arg-type]
    assert "\n" not in str(e.value) and repr(budget) in str(e.value)


def test_sample_longer_than_budget() -> None:
    with pytest.raises(PackingError) as e:
        pack_by_tokens([3, 20, 7, 20], 16)
    msg = str(e.value)
    assert msg == ("sample 1 has 20 tokens, more than max_tokens 16 (one micro-batch must hold a "
                   "whole sample); give max_tokens >= 20 or cut samples shorter")
    assert isinstance(e.value, BigBatchError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize(("lengths", "says"), [
    ([1, -2], "lengths[1] is -2, a negative length"),
    ([1, 2.0], "lengths[1] is 2.0, not an integer"),
    ([True], "lengths[0] is True, not an integer"),
    (torch.tensor([1.0, 2.0], dtype=torch.float64), "got a torch.float64 tensor"),
    (torch.ones(2, 2, dtype=torch.int64), "of shape (2, 2)"),
])
def test_bad_lengths(lengths: object, says: str) -> None:
    with pytest.raises(PackingError) as e:
        pack_by_tokens(lengths, 8)  # type: ignore[arg-type]
    assert says in str(e.value) and "\n" not in str(e.value)


# -- lengths and trimming ------------------------------------------------------------------------


def test_label_lengths() -> None:
    labels = torch.tensor([[1, 2, -100, -100], [-100] * 4, [1, -100, 3, -100], [5, 6, 7, 8]])
    assert label_lengths(labels).tolist() == [2, 0, 3, 4]
    assert label_lengths(labels, ignore_index=5).tolist() == [4, 4, 4, 4]
    assert label_lengths(torch.empty(0, 4, dtype=torch.int64)).tolist() == []
    with pytest.raises(PackingError, match=r"labels must be a \[batch, time\] tensor"):
        label_lengths(torch.tensor([1, 2]))


def test_trim_padding_cuts_every_column_tensor() -> None:
    batch = lm_batch(3, seq=10, lengths=[4, 6, 0])
    batch["attention_mask"] = torch.ones(3, 10)
    batch["weights"] = torch.arange(3)  # [B]: not a column tensor
    batch["name"] = "x"
    out = trim_padding(batch, 6)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(out[key], batch[key][:, :6])
        assert out[key].data_ptr() == batch[key].data_ptr()  # a view, no copy
    assert out["weights"] is batch["weights"] and out["name"] == "x"
    assert batch["labels"].shape == (3, 10)  # the input is untouched


@pytest.mark.parametrize(("length", "says"), [
    (5, "trimming to 5 columns would drop real labels (a row's last real label is in column 6); "
        "give length >= 6"),
    (0, "length 0 is not an integer in [1, 10]"),
    (11, "length 11 is not an integer in [1, 10]"),
    (3.0, "length 3.0 is not an integer"),
])
def test_trim_padding_refuses(length: object, says: str) -> None:
    batch = lm_batch(3, seq=10, lengths=[4, 6, 0])
    with pytest.raises(PackingError) as e:
        trim_padding(batch, length)  # type: ignore[arg-type]
    assert says in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PackingError, match="holds no \\[batch, time\\] tensor"):
        trim_padding({"x": torch.ones(3)}, 1)


def docs_of_lengths(lengths: list[int], seed: int = 0) -> list[tuple[str, bytes]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"d{i}", bytes(torch.randint(0, 256, (n,), generator=g).tolist()))
            for i, n in enumerate(lengths)]


def variable_windows(seq_len: int = 16, n: int = 60, seed: int = 0) -> TokenWindows:
    """Mostly one window per document, of 1 to seq_len real tokens; every 8th document long."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, seq_len + 2, (n,), generator=g)
    lengths[::8] *= 3
    return TokenWindows(docs_of_lengths(lengths.tolist(), seed), seq_len)


def test_token_windows_lengths() -> None:
    w = variable_windows()
    idx = torch.tensor([5, 0, 17, 5, len(w) - 1])
    lengths = w.lengths(idx)
    assert lengths.dtype == torch.int64
    assert lengths.tolist() == (w.batch(idx)["labels"] != IGNORE_INDEX).sum(1).tolist()
    assert lengths.tolist() == label_lengths(w.batch(idx)["labels"]).tolist()
    assert int(lengths.sum()) == w.tokens_in(idx)
    every = w.lengths(range(len(w)))
    assert int(every.max()) == w.seq_len and int(every.min()) < w.seq_len // 2  # variable
    assert len(set(every.tolist())) > 5
    with pytest.raises(IndexError):
        w.lengths([len(w)])


def test_packed_micro_batches_hold_the_global_batch() -> None:
    w = variable_windows()
    rows = torch.arange(len(w))[::2]
    micro = packed_micro_batches(w, rows, 40)
    full = w.batch(rows)
    assert sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in micro) == w.tokens_in(rows)
    assert all(m["labels"].numel() <= 40 for m in micro)
    assert {m["input_ids"].shape[1] for m in micro} != {w.seq_len}  # some are trimmed
    # the same rows, real tokens unchanged: match each micro-batch row back to the full batch
    seen = 0
    for m, group in zip(micro, pack_by_tokens(w.lengths(rows), 40)):
        t = m["labels"].shape[1]
        assert torch.equal(m["labels"], full["labels"][group, :t])
        assert torch.equal(m["input_ids"], full["input_ids"][group, :t])
        assert torch.all(full["labels"][group, t:] == IGNORE_INDEX)
        assert m["labels"].is_contiguous()
        seen += len(group)
    assert seen == len(rows)
    with pytest.raises(PackingError, match="give max_tokens >= 16"):
        packed_micro_batches(w, rows, 15)


def test_pack_batch_matches_pack_by_tokens() -> None:
    batch = lm_batch(9, seq=12, lengths=[3, 12, 0, 7, 7, 1, 12, 5, 2])
    batch["weights"] = torch.arange(9)
    micro = pack_batch(batch, 24, mode="tokens")
    groups = pack_by_tokens(label_lengths(batch["labels"]), 24)
    assert [m["weights"].tolist() for m in micro] == [g.tolist() for g in groups]
    assert [g.tolist() for g in groups] == [[1, 6], [3, 4, 7], [0, 8, 5, 2]]
    assert [m["labels"].shape[1] for m in micro] == [12, 7, 3]
    with pytest.raises(PackingError, match="no 'labels' tensor"):
        pack_batch({"input_ids": batch["input_ids"]}, 24)


# -- exactness -----------------------------------------------------------------------------------


def lm_loss(model, batch) -> LossSum:
    return token_cross_entropy(model(batch["input_ids"]), batch["labels"])


OPTIMIZERS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
}
SEQ, GLOBAL, MICRO, STEPS = 16, 12, 4, 3


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, seq_len=SEQ, n_layer=2, n_head=2, d_model=16))


def global_rows(w: TokenWindows) -> list[torch.Tensor]:
    batches = global_batches(len(w), GLOBAL, seed=3)
    return [next(batches) for _ in range(STEPS)]


def train(model, make_opt, cycles, clip=None) -> torch.nn.Module:
    model = copy.deepcopy(model)
    acc = Accumulator(model, make_opt(model), clip_grad_norm=clip)
    for cycle in cycles:
        acc.step(cycle, lm_loss)
    return model


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_packed_equals_fixed_equals_full_batch(opt: str, clip: float | None) -> None:
    w = variable_windows(SEQ)
    model = tiny_gpt()
    assert next(model.parameters()).dtype == torch.float64
    all_rows = global_rows(w)
    plan = BatchPlan(global_batch=GLOBAL, micro_batch=MICRO, world_size=1)
    fixed = [plan.split(w.batch(rows)) for rows in all_rows]
    packed = [packed_micro_batches(w, rows, MICRO * SEQ) for rows in all_rows]
    # the packing really regroups: other rows and widths than the fixed split
    assert any(m["labels"].shape[1] < SEQ for c in packed for m in c)
    assert any(m["labels"].shape[0] > MICRO for c in packed for m in c)
    truth = full_batch_train(model, OPTIMIZERS[opt], [[w.batch(r)] for r in all_rows],
                             lm_mean_loss, clip=clip)
    got_fixed = train(model, OPTIMIZERS[opt], fixed, clip)
    got_packed = train(model, OPTIMIZERS[opt], packed, clip)
    assert max_rel_diff(got_fixed, truth) <= RTOL
    assert max_rel_diff(got_packed, truth) <= RTOL
    assert max_rel_diff(got_packed, got_fixed) <= RTOL
    assert max_rel_diff(truth, model) > 1e-3  # training moved the weights: the check has teeth


def test_pack_batch_is_exact_with_empty_rows() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    g = torch.Generator().manual_seed(1)
    cycles = [lm_batch(10, generator=g) for _ in range(STEPS)]  # lengths 0..12, some rows empty
    truth = full_batch_train(model, OPTIMIZERS["adamw"], [[b] for b in cycles], lm_mean_loss)
    got = train(model, OPTIMIZERS["adamw"], [pack_batch(b, 30) for b in cycles])
    assert max_rel_diff(got, truth) <= RTOL


def test_padding_to_more_micro_batches_keeps_the_update() -> None:
    """What a data-parallel rank with fewer packed micro-batches does: the update is unchanged."""
    w = variable_windows(SEQ)
    model = tiny_gpt()
    all_rows = global_rows(w)
    packed = [packed_micro_batches(w, rows, MICRO * SEQ) for rows in all_rows]
    padded = [pad_micro_batches(c, len(c) + 2) for c in packed]
    assert [len(c) for c in padded] == [len(c) + 2 for c in packed]
    for c in padded:
        assert c[-1]["labels"].tolist() == [[IGNORE_INDEX]]
        assert c[-1]["input_ids"].shape == (1, 1)
    truth = full_batch_train(model, OPTIMIZERS["adamw"], [[w.batch(r)] for r in all_rows],
                             lm_mean_loss)
    assert max_rel_diff(train(model, OPTIMIZERS["adamw"], padded), truth) <= RTOL
    same = pad_micro_batches(packed[0], len(packed[0]))
    assert all(a[k] is b[k] for a, b in zip(same, packed[0], strict=True) for k in a)
    with pytest.raises(PackingError, match=f"n 1 is not an integer >= {len(packed[0])}"):
        pad_micro_batches(packed[0], 1)
    with pytest.raises(PackingError, match="needs at least one micro-batch"):
        pad_micro_batches([], 2)


def mean_of_means_train(model, make_opt, cycles) -> torch.nn.Module:
    """The popular recipe: each micro-batch's mean loss / number of micro-batches."""
    model = copy.deepcopy(model)
    opt = make_opt(model)
    for cycle in cycles:
        opt.zero_grad(set_to_none=True)
        for micro in cycle:
            (lm_mean_loss(model, micro) / len(cycle)).backward()
        opt.step()
    return model


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_mean_of_means_cannot_pack(opt: str) -> None:
    w = variable_windows(SEQ)
    model = tiny_gpt()
    all_rows = global_rows(w)
    plan = BatchPlan(global_batch=GLOBAL, micro_batch=MICRO, world_size=1)
    truth = full_batch_train(model, OPTIMIZERS[opt], [[w.batch(r)] for r in all_rows],
                             lm_mean_loss)
    packed = [packed_micro_batches(w, rows, MICRO * SEQ) for rows in all_rows]
    fixed = [plan.split(w.batch(rows)) for rows in all_rows]
    naive_packed = mean_of_means_train(model, OPTIMIZERS[opt], packed)
    naive_fixed = mean_of_means_train(model, OPTIMIZERS[opt], fixed)
    assert max_rel_diff(naive_packed, truth) > 1e4 * RTOL  # far outside the tolerance
    assert max_rel_diff(naive_packed, naive_fixed) > 1e4 * RTOL  # and it depends on the cut
    assert max_rel_diff(train(model, OPTIMIZERS[opt], packed), truth) <= RTOL


# -- the corpus ----------------------------------------------------------------------------------


def test_split_definitions() -> None:
    source = (b"import os\r\n\r\n@decorator(1)\r\n@other\r\ndef f(x):\r\n    def inner():\r\n"
              b"        pass\r\n    return x\r\n\r\nX = 1\r\n\r\nclass C:\r\n    '\\d'\r\n\r\n"
              b"async def g():\r\n    await h()\r\n")
    docs = [("m.py", source), ("broken.py", b"def (:\n"), ("nul.py", b"x = 1\0\n"),
            ("empty.py", b"")]
    out = split_definitions(docs)
    assert [name for name, _ in out] == ["m.py:f", "m.py:C", "m.py:g"]
    assert out[0][1] == (b"@decorator(1)\r\n@other\r\ndef f(x):\r\n    def inner():\r\n"
                         b"        pass\r\n    return x\r\n")
    assert out[1][1] == b"class C:\r\n    '\\d'\r\n"
    assert out[2][1] == b"async def g():\r\n    await h()\r\n"


def test_stdlib_definitions() -> None:
    docs = stdlib_definitions()
    assert len(docs) > 1000
    names = [name for name, _ in docs]
    assert "json/encoder.py:JSONEncoder" in names
    data = dict(docs)["json/encoder.py:JSONEncoder"]
    assert data.startswith(b"class JSONEncoder") and b"def encode(self, o)" in data
    sizes = sorted(len(d) for _, d in docs)
    assert sizes[len(sizes) // 10] * 20 < sizes[-len(sizes) // 10]  # lengths vary a lot
