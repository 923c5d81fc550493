"""One rank of a multi-process test: ``python dist_worker.py CASE OUT_DIR`` with RANK, WORLD_SIZE
and INIT_FILE in the environment (set by :func:`launch`). Each rank writes ``OUT_DIR/rank<r>.pt``
(plain tensors and numbers) for the test to compare against a single-process truth."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from reference import TinyLM, lm_batch

STEPS, K, MICRO, WORLD = 3, 3, 2, 2


def data(world: int = WORLD, k: int = K) -> list[list[list[dict[str, torch.Tensor]]]]:
    """``data[step][rank]``: that rank's K micro-batches; token counts differ a lot by rank."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        per_rank = []
        for r in range(world):
            lengths = [1, 2] if r == 0 else [12, 11]  # rank 0 holds far fewer tokens
            per_rank.append([lm_batch(MICRO, lengths=lengths, generator=g) for _ in range(k)])
        out.append(per_rank)
    return out


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyLM().double()


def sgd(m: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)


def lm_sum(m: torch.nn.Module, batch: dict[str, torch.Tensor]):
    from bigbatch import token_cross_entropy

    return token_cross_entropy(m(batch["input_ids"]), batch["labels"])


def launch(case: str, out: Path, world: int = WORLD, timeout: float = 120) -> list[str]:
    """Run ``case`` on ``world`` ranks; returns each rank's stderr. Fails on timeout (a hang)."""
    init = out / "init"
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
               "INIT_FILE": str(init), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, case, str(out)], env=env,
                                      stderr=subprocess.PIPE, text=True))
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=timeout)[1])
    finally:
        for p in procs:
            p.kill()
    for p, err in zip(procs, errs):
        assert p.returncode == 0, err
    return errs


# -- cases: each runs on every rank and returns what that rank saves -------------------------

def _train(wrap: Callable[[torch.nn.Module], torch.nn.Module], sync: str = "cycle",
           naive: bool = False) -> dict:
    from bigbatch import Accumulator
    from bigbatch.verify import naive_loss

    rank = dist.get_rank()
    net = wrap(model())
    acc = Accumulator(net, sgd(net), clip_grad_norm=0.5, sync=sync)  # type: ignore[arg-type]
    loss_fn = naive_loss(lm_sum) if naive else lm_sum
    losses = []
    for per_rank in data():
        losses.append(acc.step(per_rank[rank], loss_fn).loss)
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in net.parameters()]
    return {"params": [p.detach().clone() for p in params], "losses": losses}


def _ddp(m: torch.nn.Module) -> torch.nn.Module:
    return torch.nn.parallel.DistributedDataParallel(m)


def _fsdp2(m: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in m.blocks.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def case_ddp() -> dict:
    return _train(_ddp)


def case_ddp_naive() -> dict:
    return _train(_ddp, naive=True)


def case_fsdp2_cycle() -> dict:
    return _train(_fsdp2, "cycle")


def case_fsdp2_micro() -> dict:
    return _train(_fsdp2, "micro")


def case_fsdp2_cycle_naive() -> dict:
    return _train(_fsdp2, "cycle", naive=True)


def case_fsdp2_micro_naive() -> dict:
    return _train(_fsdp2, "micro", naive=True)


def _count_syncs(sync: str, oom: str = "raise") -> dict:
    """Which micro-batch each DDP gradient all-reduce (one comm-hook call per bucket) ran in."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from bigbatch import Accumulator

    rank = dist.get_rank()
    net = _ddp(model())
    where: dict[str, int] = {"step": 0, "micro": 0}
    calls: list[tuple[int, int]] = []

    def hook(state, bucket):
        calls.append((where["step"], where["micro"]))
        return allreduce_hook(state, bucket)

    net.register_comm_hook(None, hook)
    acc = Accumulator(net, sgd(net), sync=sync, oom=oom)  # type: ignore[arg-type]

    def counted(m, batch):
        out = lm_sum(m, batch)
        where["micro"] += 1
        return out

    for step, per_rank in enumerate(data()):
        where["step"], where["micro"] = step, 0
        acc.step(per_rank[rank], counted)
    return {"calls": torch.tensor(calls)}


def case_syncs_cycle() -> dict:
    return _count_syncs("cycle")


def case_syncs_split() -> dict:
    """oom='split' (the default): no DDP hook round at all; finish() all-reduces instead."""
    return _count_syncs("cycle", oom="split")


def case_syncs_micro() -> dict:
    return _count_syncs("micro")


def case_ddp_oom(forget_reached: bool = False) -> dict:
    """Only rank 1 runs out of memory (first in a forward, then in backwards, mid-cycle): it
    splits its micro-batches on its own and the step is still the full-batch one.

    ``forget_reached``: the negative case — the runner no longer knows which parameters the failed
    backward had already reached, so the halves add their gradient there a second time."""
    from reference import FaultyLM

    from bigbatch import Accumulator

    rank = dist.get_rank()
    inner = FaultyLM()
    net = _ddp(inner)
    acc = Accumulator(net, sgd(net), clip_grad_norm=0.5, oom_regrow_after=1)
    if forget_reached:
        acc.runner.reached = lambda: []  # type: ignore[method-assign]
    calls = {"n": 0}

    def loss_fn(m, batch):  # step 1: calls 1-6 (2 fails in its forward); step 2: 7-12 in
        calls["n"] += 1     # pieces of 1 row; step 3: whole again, 14 fails in its backward
        if rank == 1:
            inner.limits["forward"] = 1 if calls["n"] == 2 else 10**9
            inner.limits["backward"] = 1 if calls["n"] == 14 else 10**9
        return lm_sum(m, batch)

    stats = [acc.step(per_rank[rank], loss_fn) for per_rank in data()]
    return {"params": [p.detach().clone() for p in inner.lm.parameters()],
            "losses": [s.loss for s in stats], "splits": [s.oom_splits for s in stats],
            "raised": inner.limits["raised"]}


def case_ddp_oom_forgetful() -> dict:
    return case_ddp_oom(forget_reached=True)


def case_noise() -> dict:
    """Noise estimates under DDP: each rank's micro-batch gradients, taken before the all-reduce."""
    from bigbatch import Accumulator

    rank = dist.get_rank()
    net = _ddp(model())
    acc = Accumulator(net, sgd(net), noise_scale=True)
    out = []
    for per_rank in data():
        est = acc.step(per_rank[rank], lm_sum).noise
        out.append([est.grad_sq, est.trace, est.small_batch, est.big_batch])
    return {"noise": out}


def contrastive_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(24, 5, generator=g), torch.randn(24, 7, generator=g)


class Towers(torch.nn.Module):
    """Query and document towers; DDP syncs only what runs through its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.d = torch.nn.Linear(5, 8), torch.nn.Linear(7, 8)

    def forward(self, q: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q(q), self.d(d)


def contrastive_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return Towers().double()


def case_contrastive() -> dict:
    """Gradient caching on 2 ranks: negatives span both ranks; rank r holds rows of its half."""
    from bigbatch import Accumulator
    from bigbatch.contrastive import contrastive_step, info_nce

    rank = dist.get_rank()
    q, d = contrastive_data()
    lo, hi = (0, 8) if rank == 0 else (8, 24)  # uneven shares: 8 and 16 rows
    mine = list(zip(q[lo:hi].chunk(2), d[lo:hi].chunk(2)))
    net = _ddp(contrastive_model())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    stats = contrastive_step(Accumulator(net, opt), mine,
                             lambda m, b: m(*b),
                             lambda a, b: info_nce(a, b, symmetric=True))
    return {"params": [p.detach().clone() for p in net.parameters()], "loss": stats.loss}


def case_uneven() -> dict:
    """Rank 1 has one micro-batch fewer: both ranks must stop with the same clear error."""
    from bigbatch import Accumulator
    from bigbatch.engine.sync import DistributedError

    rank = dist.get_rank()
    net = _ddp(model())
    acc = Accumulator(net, sgd(net))
    batches = data()[0][rank]
    acc.step(batches, lm_sum)  # a good step first
    try:
        acc.step(batches[: K - rank], lm_sum)
    except DistributedError as e:
        return {"error": str(e)}
    return {"error": ""}


def case_refusals() -> dict:
    """A plain module in a group, and an FSDP2 cycle that never synced, are refused clearly."""
    from bigbatch import Accumulator
    from bigbatch.engine.sync import DistributedError

    out = {}
    try:
        plain = model()
        Accumulator(plain, sgd(plain))
    except DistributedError as e:
        out["plain"] = str(e)
    net = _fsdp2(model())
    acc = Accumulator(net, sgd(net))
    for b in data()[0][dist.get_rank()]:
        acc.accumulate(b, lm_sum)  # no last=True
    try:
        acc.finish()
    except DistributedError as e:
        out["fsdp2_no_last"] = str(e)
    out.update(_oom_and_fsdp1_refusals())
    return out


def _oom_and_fsdp1_refusals() -> dict:
    """Splitting after out-of-memory is refused under FSDP2 and under DDP broadcasting buffers
    (allowed with broadcast_buffers=False)."""
    from bigbatch import Accumulator, BigBatchError

    out = {}
    for name, build in {
        "split_fsdp2": lambda: _fsdp2(model()),
        "split_ddp_buffers": lambda: _ddp(_with_buffers()),
    }.items():
        net = build()
        try:
            Accumulator(net, sgd(net), oom="split")
        except BigBatchError as e:
            out[name] = str(e)
    with warnings.catch_warnings():  # newer torch renames the flag; the old one still works
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.nn.parallel.DistributedDataParallel(_with_buffers(), broadcast_buffers=False)
    out["split_ddp_no_broadcast"] = Accumulator(net, sgd(net), oom="split").runner.split
    return out


def _with_buffers() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).double()


def main() -> None:
    case, out = sys.argv[1], Path(sys.argv[2])
    torch.set_default_dtype(torch.float64)
    dist.init_process_group("gloo", init_method=f"file://{os.environ['INIT_FILE']}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    try:
        result = globals()[f"case_{case}"]()
        torch.save(result, out / f"rank{dist.get_rank()}.pt")
        dist.barrier()
    finally:
        gc.collect()  # DDP/FSDP2 objects hold the group; see bigbatch.launch.Ranks.close
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
