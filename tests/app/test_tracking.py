"""``--log-to``: MLflow (local file store) and W&B (offline) get the numbers of ``metrics.jsonl``,
the config and the final metrics, read back through their own formats; nothing reaches the
network; a tracker that is not installed is one line naming its extra, before anything is
written."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import yaml
from runcli import run

TINY = ["--n-layer", "1", "--d-model", "32", "--n-head", "2", "--seq-len", "32", "--device", "cpu",
        "--eval-samples", "16", "--global-batch", "8", "--micro-batch", "4", "--steps", "4",
        "--eval-every", "2"]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No connection leaves this machine (loopback and local sockets are W&B's own service)."""
    real = socket.socket.connect

    def connect(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a connection to {address} was attempted")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_DIR",
                 "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    # the code sets these when unset; keep them from leaking into other tests
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def expected(out: Path) -> dict[tuple[str, int], float]:
    """Every finite number of metrics.jsonl as the trackers name it: (key, step) → value."""
    want = {}
    for r in records(out):
        prefix = "train/" if r["kind"] == "train" else "val/"
        for k, v in r.items():
            if k in ("kind", "step") or isinstance(v, str) or v is None:
                continue
            name = "val/loss" if k == "val_loss" else prefix + k
            want[name, r["step"]] = float(v)
    return want


def test_mlflow_file_store_holds_what_metrics_jsonl_holds(tmp_path: Path, text: Path,
                                                          offline: None) -> None:
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "run"
    r = run("train", "--data", str(text), "--out", str(out), "--log-to", "mlflow", *TINY)
    assert r.returncode == 0, r.stderr
    assert not (out / "tb").exists()  # named trackers only: no TensorBoard
    run_id = json.loads((out / "tracking.json").read_text())["mlflow"]
    client = mlflow.tracking.MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    want = expected(out)
    keys = {k for k, _ in want}
    assert {"train/loss", "train/grad_norm", "train/lr", "train/items", "val/loss"} <= keys
    got = {(k, m.step): m.value for k in keys for m in client.get_metric_history(run_id, k)}
    assert got == want
    # the config as parameters, the final metrics at the end
    config = yaml.safe_load((out / "config.yaml").read_text())
    params = logged.data.params
    assert params["lr"] == str(config["optim"]["lr"]) and params["log_to"] == "mlflow"
    assert params["global_batch"] == "8" and params["accum_steps"] == "2"
    last_eval = [x for x in records(out) if x["kind"] == "eval"][-1]
    assert logged.data.metrics["final/val_loss"] == last_eval["val_loss"]
    assert logged.data.metrics["final/steps"] == 4


def test_mlflow_tracking_uri_is_honoured(tmp_path: Path, text: Path, offline: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    mlflow = pytest.importorskip("mlflow")
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "mine")
    out = tmp_path / "run"
    r = run("train", "--data", str(text), "--out", str(out), "--log-to", "mlflow", *TINY[:-4],
            "--steps", "2", "--eval-every", "0")
    assert r.returncode == 0, r.stderr
    assert not (out / "mlruns").exists()
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("mine")
    (found,) = client.search_runs([experiment.experiment_id])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")] == [1, 2]


def test_wandb_offline_run_holds_what_metrics_jsonl_holds(tmp_path: Path, text: Path,
                                                          offline: None) -> None:
    pytest.importorskip("wandb")
    from wandb_offline import read_run

    out = tmp_path / "run"
    r = run("train", "--data", str(text), "--out", str(out), "--log-to", "tensorboard,wandb",
            *TINY)
    assert r.returncode == 0, r.stderr
    assert any((out / "tb").glob("events.out.tfevents.*"))
    run_id = json.loads((out / "tracking.json").read_text())["wandb"]
    (path,) = (out / "wandb").glob(f"offline-run-*/run-{run_id}.wandb")  # offline, in the run
    logged = read_run(path)
    got = {(k, row["_step"]): v for row in logged["history"] for k, v in row.items()
           if not k.startswith("_")}
    want = expected(out)
    assert got == want, {k: (got.get(k), want.get(k)) for k in set(got) | set(want)
                         if got.get(k) != want.get(k)}
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert logged["config"]["lr"] == config["optim"]["lr"]
    assert logged["config"]["seed"] == 0 and logged["config"]["global_batch"] == 8
    last_eval = [x for x in records(out) if x["kind"] == "eval"][-1]
    assert logged["summary"]["final/val_loss"] == last_eval["val_loss"]
    assert logged["summary"]["final/steps"] == 4


@pytest.mark.parametrize("name", ["mlflow", "wandb", "tensorboard"])
def test_a_tracker_not_installed_is_one_line_naming_its_extra(
        tmp_path: Path, text: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    out = tmp_path / "run"
    r = run("train", "--data", str(text), "--out", str(out), "--log-to", f"{name}", *TINY)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert f"pip install 'bigbatch[{name}]'" in r.stderr
    assert not out.exists()  # refused before anything was written


def test_log_to_refuses_unknown_names_and_none_logs_only_metrics(tmp_path: Path,
                                                                text: Path) -> None:
    r = run("train", "--data", str(text), "--out", str(tmp_path / "a"), "--log-to",
            "mlflow,neptune", *TINY)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "--log-to takes tensorboard, mlflow, wandb" in r.stderr and "neptune" in r.stderr
    out = tmp_path / "b"
    r = run("train", "--data", str(text), "--out", str(out), "--log-to", "none", *TINY[:-4],
            "--steps", "1")
    assert r.returncode == 0, r.stderr
    assert (out / "metrics.jsonl").is_file() and not (out / "tb").exists()
    assert not (out / "tracking.json").exists()
