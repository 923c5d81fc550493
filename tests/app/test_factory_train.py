"""``bigbatch train --model file.py:make``: the user's model, rows and loss, trained exactly."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import torch
from runcli import run
from safetensors.torch import load_file

from bigbatch.app.data import global_batches
from bigbatch.app.data.loading import split_rows

SETUP = textwrap.dedent('''
    import torch, bigbatch

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(120, 6, generator=g, dtype=torch.float64)
        w = torch.rand(120, generator=g, dtype=torch.float64).round() * 3  # 0 or 3 items a row
        y = (x.sum(1) > 0).double()
        model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                                    torch.nn.Linear(16, 1)).double()

        def loss_fn(model, batch):  # rows weigh 0 or 3 items: uneven counts per micro-batch
            per = torch.nn.functional.binary_cross_entropy_with_logits(
                model(batch["x"])[:, 0], batch["y"], reduction="none")
            return bigbatch.LossSum((per * batch["w"]).sum(), batch["w"].sum().long())

        return model, {"x": x, "y": y, "w": w}, loss_fn
''')


def test_a_factory_model_trains_exactly(tmp_path: Path) -> None:
    (tmp_path / "setup.py").write_text(SETUP)
    out = tmp_path / "run"
    r = run("train", "--model", f"{tmp_path / 'setup.py'}:make", "--dtype", "float64",
            "--global-batch", "16", "--micro-batch", "4", "--steps", "5", "--schedule",
            "constant", "--warmup", "0", "--eval-every", "0", "--out", str(out),
            "--device", "cpu", "--no-noise-scale")
    assert r.returncode == 0, r.stderr
    assert "items/s" in r.stderr
    # the reference: the factory called again, full batches in the run's order, plain torch
    scope: dict = {}
    exec(SETUP, scope)  # noqa: S102 (the test's own setup code)
    torch.manual_seed(0)
    model, rows, _ = scope["make"]()
    train, _ = split_rows(rows)  # which rows validate: the command's rule, not under test
    start = copy.deepcopy(model)
    groups = [{"params": [p for p in model.parameters() if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.95))
    order = global_batches(len(train), 16, 0)
    for _ in range(5):
        b = train.batch(next(order))
        per = torch.nn.functional.binary_cross_entropy_with_logits(model(b["x"])[:, 0], b["y"],
                                                                   reduction="none")
        loss = (per * b["w"]).sum() / b["w"].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    got = load_file(str(out / "model.safetensors"))
    for name, p in model.state_dict().items():
        moved = (p - start.state_dict()[name]).abs().max()
        assert (got[name] - p).abs().max() <= 1e-10 * moved, name
