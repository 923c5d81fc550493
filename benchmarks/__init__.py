"""Benchmarks of bigbatch, all run one way: ``python -m benchmarks NAME [--quick] [flags]``.

``python -m benchmarks --list`` lists them; ``benchmarks/README.md`` says how they measure and
holds their latest tables. Each is a module here with a ``main(argv)``; what they share (flags,
the interleaved timing loop, child processes, the results files) is :mod:`benchmarks._harness`.
"""

#: name → module of every benchmark ``python -m benchmarks`` lists, in the README's order.
BENCHMARKS = {
    "peers": "benchmarks.peers",
    "engine_profile": "benchmarks.engine_profile",
    "memory_k": "benchmarks.memory_k",
    "packing": "benchmarks.packing",
    "attention_rows": "benchmarks.attention_rows",
    "batchnorm_digits": "benchmarks.batchnorm_digits",
    "noise_overhead": "benchmarks.noise_overhead",
    "sync": "benchmarks.sync",
    "checkpoint_cost": "benchmarks.checkpoint_cost",
    "jax": "benchmarks.jax_step",
}

#: child processes the benchmarks start (``python -m benchmarks NAME``); not listed.
INTERNAL = {
    "fullbatch_child": "benchmarks.fullbatch_child",
}
