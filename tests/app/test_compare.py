"""compare: full batch, bigbatch and the naive recipe on the same data, in float64."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import pytest

from bigbatch import BatchPlanError
from bigbatch.app.compare import compare, format_compare
from bigbatch.app.config import TrainConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> TrainConfig:
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_bytes((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_bytes())
    return TrainConfig.of(n_layer=1, d_model=32, n_head=2, seq_len=32, global_batch=8,
                       micro_batch=2, data=str(path), device="cpu", dtype="float64", warmup=0,
                       steps=4)


def test_compare_three_runs(config: TrainConfig, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    import bigbatch.app.compare as compare_module

    engines: list[int] = []  # the full-batch arm is plain PyTorch: only two runs use the engine

    class Counted(compare_module.Accumulator):
        def __init__(self, *args, **kwargs) -> None:
            engines.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(compare_module, "Accumulator", Counted)
    png = tmp_path / "c.png"
    lines: list[str] = []
    result = compare(config, steps=4, accum_steps=4, out_png=png, log=lines.append)
    assert len(engines) == 2
    assert result.png == png and png.read_bytes()[:8] == PNG_MAGIC
    assert set(result.losses) == {"full batch", "bigbatch", "naive"}
    assert all(len(v) == 4 and all(math.isfinite(x) for x in v) for v in result.losses.values())
    assert result.distance["full batch"] == 0.0
    assert result.distance["bigbatch"] < 1e-10  # float64: the same weights
    assert result.distance["naive"] > 1e-3  # the naive recipe drifted
    # the first loss is measured before any update: identical for all three runs
    first = {v[0] for v in result.losses.values()}
    assert max(first) - min(first) < 1e-12
    # true token means, also for the naive run (not its mean of micro-batch means)
    assert all(abs(a - b) < 1e-9 for a, b in zip(result.losses["bigbatch"],
                                                  result.losses["full batch"]))
    assert (result.k, result.global_batch, result.steps) == (4, 8, 4)
    assert len(lines) == 3 and all(name in line for name, line in
                                   zip(("full batch", "bigbatch", "naive"), lines))
    table = format_compare(result).splitlines()
    assert table[0].startswith("| run | K |") and len(table) == 5
    assert table[2].startswith("| full batch | 1 |") and table[3].startswith("| bigbatch | 4 |")
    assert table[4].startswith("| naive | 4 |")


def test_compare_k_must_divide_the_global_batch(config: TrainConfig, tmp_path: Path) -> None:
    with pytest.raises(BatchPlanError, match="not divisible by accum_steps 3"):
        compare(config, steps=1, accum_steps=3, out_png=tmp_path / "x.png", log=lambda _: None)
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("steps", [3, 10, 40])
def test_plot_labels_whole_optimizer_steps(tmp_path: Path, steps: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    from bigbatch.app.compare import CompareResult, _plot

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its ticks
    curve = [1.0 / (i + 1) for i in range(steps)]
    _plot(CompareResult({"full batch": curve, "bigbatch": curve, "naive": curve},
                        {"full batch": 0.0, "bigbatch": 0.0, "naive": 0.1}, k=4,
                        global_batch=8, steps=steps, png=tmp_path / "c.png"))
    ticks = [t.get_text() for t in figures[0].axes[0].get_xticklabels()]
    assert ticks and all(t.lstrip("−-").isdigit() for t in ticks), ticks
