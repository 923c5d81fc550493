"""Data-parallel runs of the JAX port for ``tests/jax/test_jax_parallel.py``, in a fresh process
(the device count is fixed when JAX starts).

    python jax_devices_worker.py mesh                  # 2 simulated CPU devices, one process
    python jax_devices_worker.py process RANK PORT     # 2 processes, jax.distributed, 1 device each

Each trains 3 cycles (4 micro-batches of 4 rows, very uneven tokens per device, the last cycle
short) with the rows of every micro-batch split over 2 devices, and prints one JSON line: the
update's relative error against the full-batch reference and against one device, and where the
compiled step's all-reduces are.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

MODE = sys.argv[1]
if MODE == "mesh":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=2")

import jax  # noqa: E402

if MODE == "process":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[3]}", num_processes=2,
                               process_id=int(sys.argv[2]))
jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from jax_reference import (  # noqa: E402
    OPTIMIZER,
    full_batch_train,
    init_params,
    logits,
    uneven_cycles,
    update_error,
)

import bigbatch.jax as bj  # noqa: E402


def loss_fn(params: Any, batch: dict[str, Any]) -> bj.LossSum:
    return bj.token_cross_entropy(logits(params, batch["ids"]), batch["labels"])


def all_reduces(step: Any, *args: Any) -> dict[str, int]:
    """Computation name -> all-reduce instructions in the compiled program."""
    where: dict[str, int] = {}
    name = ""
    for line in step.lower(*args).compile().as_text().splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            name = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
        if re.search(r"\ball-reduce(-start)?\(", line):
            where[name] = where.get(name, 0) + 1
    return where


def local_rows(cycle: bj.Cycle, rank: int) -> bj.Cycle:
    return bj.Cycle(jax.tree_util.tree_map(lambda x: x[:, 2 * rank:2 * rank + 2], cycle.batches),
                    cycle.valid)


def main() -> None:
    cycles = uneven_cycles(k=4, rows=4, n_cycles=3, last=3)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.size == 2, jax.devices()
    p0 = init_params()
    want = full_batch_train(p0, cycles)
    multi = bj.make_step(loss_fn, OPTIMIZER, mesh=mesh)
    params, state, counts = p0, OPTIMIZER.init(p0), []
    for mbs in cycles:
        cycle = bj.stack(mbs, k=4)
        if MODE == "process":
            cycle = local_rows(cycle, jax.process_index())
        params, state, stats = multi(params, state, bj.shard_cycle(cycle, mesh))
        counts.append(int(stats.count))
    got = jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), params)
    out: dict[str, Any] = {"devices": len(jax.devices()), "processes": jax.process_count(),
                           "vs_full": update_error(got, want, p0), "counts": counts}
    if MODE == "mesh":
        single = bj.make_step(loss_fn, OPTIMIZER)
        params, state = p0, OPTIMIZER.init(p0)
        for mbs in cycles:
            params, state, _ = single(params, state, bj.stack(mbs, k=4))
        out["vs_one_device"] = update_error(got, params, p0)
        s0 = OPTIMIZER.init(p0)
        out["all_reduces"] = {str(k): all_reduces(multi, p0, s0, bj.stack(cycles[0][:k]))
                              for k in (2, 4)}
    print(json.dumps(out), flush=True)
    if MODE == "process":
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
