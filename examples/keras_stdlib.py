"""Keras ``fit`` with exact accumulation, on lines of Python's own standard library.

Run: ``python examples/keras_stdlib.py [--out keras.png] [--epochs 4]`` (needs the ``keras``
extra; about a minute on 2 CPU cores). A byte-level next-character model (Embedding with
``mask_zero`` → GRU → Dense) reads source lines of a few standard-library modules, padded to 48
bytes, so micro-batches hold very different numbers of real bytes. Three copies of one model train
in float64 on the same 64-line batches:

1. full batch: ``model.fit(batch_size=64)`` (the truth);
2. bigbatch: ``AccumulatingModel(model, micro_batch=8)``, ``fit(batch_size=64)``;
3. Keras's own: ``Adam(gradient_accumulation_steps=8)``, ``fit(batch_size=8)``.

It prints, after every epoch, each copy's distance from the full-batch weights
(‖θ − θ_full‖ / ‖θ_full − θ_0‖) and plots the training loss and those distances.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import bigbatch.keras as bk  # noqa: E402

MODULES = ("textwrap.py", "json/decoder.py", "csv.py", "glob.py")
LENGTH, LINES, BATCH, MICRO = 48, 512, 64, 8


def stdlib_lines() -> tuple[np.ndarray, np.ndarray]:
    """Non-empty source lines as bytes + 1 (0 is padding), cut at LENGTH; targets: next byte."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines = [line for m in MODULES for line in (stdlib / m).read_bytes().splitlines()
             if line.strip()]
    lines = lines[:LINES]
    x = np.zeros((len(lines), LENGTH), "int64")
    for i, line in enumerate(lines):
        row = np.frombuffer(line[:LENGTH], np.uint8).astype("int64") + 1
        x[i, :len(row)] = row
    y = np.zeros_like(x)
    y[:, :-1] = x[:, 1:]
    x[y == 0] = 0  # the last byte of a line predicts nothing: mask it
    return x, y


def make_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    tokens = keras.Input((LENGTH,), dtype="int64")
    h = keras.layers.Embedding(257, 32, mask_zero=True)(tokens)
    h = keras.layers.GRU(64, return_sequences=True)(h)
    return keras.Model(tokens, keras.layers.Dense(257)(h))


def adam(**kw) -> keras.Optimizer:
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, decay_steps=64)
    return keras.optimizers.Adam(schedule, global_clipnorm=1.0, **kw)


def loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def distance(weights: list[np.ndarray], full: list[np.ndarray], start: list[np.ndarray]) -> float:
    def norm(pairs) -> float:
        return float(np.sqrt(sum(np.square(a - b).sum() for a, b in pairs)))
    return norm(zip(weights, full)) / norm(zip(full, start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("keras_stdlib.png"))
    args = parser.parse_args()
    keras.config.set_floatx("float64")
    x, y = stdlib_lines()
    print(f"{len(x)} lines, {int((x > 0).sum())} real bytes; per micro-batch of {MICRO}: "
          f"{min((x[i:i + MICRO] > 0).sum() for i in range(0, len(x), MICRO))} to "
          f"{max((x[i:i + MICRO] > 0).sum() for i in range(0, len(x), MICRO))} bytes")

    full, ours, keras_own = make_model(), make_model(), make_model()
    start = full.get_weights()
    full.compile(adam(), loss())
    wrapped = bk.AccumulatingModel(ours, micro_batch=MICRO)
    wrapped.compile(adam(), loss())
    keras_own.compile(adam(gradient_accumulation_steps=BATCH // MICRO), loss())
    curves: dict[str, list[float]] = {"full batch": [], "bigbatch": [], "keras": []}
    far: dict[str, list[float]] = {"bigbatch": [], "keras": []}
    for epoch in range(args.epochs):
        for name, model, batch in (("full batch", full, BATCH), ("bigbatch", wrapped, BATCH),
                                   ("keras", keras_own, MICRO)):
            history = model.fit(x, y, batch_size=batch, shuffle=False, verbose=0)
            curves[name].append(history.history["loss"][-1])
        for name, model in (("bigbatch", ours), ("keras", keras_own)):
            far[name].append(distance(model.get_weights(), full.get_weights(), start))
        print(f"epoch {epoch + 1}: loss {curves['full batch'][-1]:.4f} (full batch), "
              f"{curves['bigbatch'][-1]:.4f} (bigbatch), {curves['keras'][-1]:.4f} (Keras's "
              f"own); distance from full batch: bigbatch {far['bigbatch'][-1]:.2e}, Keras's "
              f"own {far['keras'][-1]:.2e}")
    plot(curves, far, args.out)
    print(f"plot: {args.out}")


def plot(curves: dict[str, list[float]], far: dict[str, list[float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = range(1, len(curves["full batch"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = {"keras": "Keras's gradient_accumulation_steps"}
    for (name, values), style in zip(curves.items(), ("-", "--", ":")):
        left.plot(epochs, values, style, marker="o", label=labels.get(name, name))
    left.set(xlabel="epoch", ylabel="training loss (nats/byte)", title="loss", xticks=epochs)
    left.legend(loc="lower left")
    for name, values in far.items():
        right.semilogy(epochs, values, marker="o", label=labels.get(name, name))
    right.set(xlabel="epoch", ylabel="‖θ − θ_full‖ / ‖θ_full − θ_0‖",
              title=f"distance from the full batch ({BATCH} = {BATCH // MICRO} × {MICRO} rows)",
              xticks=epochs)
    right.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
