"""Experiment trackers a run logs to besides ``metrics.jsonl``: TensorBoard, MLflow, W&B.

``--log-to`` names them, comma-separated (``auto``, the default: TensorBoard when it is
installed; ``none``: ``metrics.jsonl`` alone). Each tracker gets, through its own client library,
the numeric values of every ``metrics.jsonl`` line as scalars at that optimizer step
(``train/<key>``; ``val/loss`` and ``val/<key>`` for evaluations), the configuration as
parameters, and the final metrics (``final/<key>``) at the end. Everything is written under the
run folder, and nothing leaves the machine unless the environment asks for it:

* ``tensorboard``: event files in ``tb/`` (``bigbatch[tensorboard]``);
* ``mlflow``: an MLflow run in the local file store ``mlruns/``, or at ``$MLFLOW_TRACKING_URI``
  when set; experiment ``$MLFLOW_EXPERIMENT_NAME`` or ``bigbatch`` (``bigbatch[mlflow]``, the
  ``mlflow-skinny`` client). MLflow 3 refuses file stores unless ``MLFLOW_ALLOW_FILE_STORE`` is
  set, and collects usage telemetry unless ``MLFLOW_DISABLE_TELEMETRY`` is: both are set
  (when not set already) before MLflow is imported;
* ``wandb``: a Weights & Biases run in offline mode under ``wandb/`` (or ``$WANDB_DIR``), project
  ``$WANDB_PROJECT`` or ``bigbatch`` (``bigbatch[wandb]``); ``wandb sync`` uploads it later, and
  ``WANDB_MODE=online`` logs online instead.

A resumed run logs into the same MLflow run and W&B run id (kept in ``tracking.json``); the
steps it repeats after its checkpoint are logged again (``metrics.jsonl`` and TensorBoard drop
the first copies, MLflow and W&B keep both).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Protocol

from ..errors import BigBatchError

__all__ = ["TRACKERS", "Tracker", "TrackerError", "check_installed", "numeric", "open_trackers",
           "parse_log_to"]

TRACKERS = ("tensorboard", "mlflow", "wandb")
IDS_FILE = "tracking.json"


class TrackerError(BigBatchError):
    """A tracker named by ``--log-to`` is not installed or cannot be opened."""


class Tracker(Protocol):
    def scalars(self, values: dict[str, float], step: int) -> None: ...

    def final(self, values: dict[str, float], step: int) -> None: ...

    def close(self, ok: bool) -> None: ...


def parse_log_to(text: str) -> tuple[str, ...]:
    """``"tensorboard,mlflow"`` → ``("tensorboard", "mlflow")``; ``auto`` and ``none`` stand alone.

    Raises:
        ValueError: an unknown name, or ``auto``/``none`` mixed with names.
    """
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if words in (["auto"], ["none"]):
        return (words[0],)
    unknown = [w for w in words if w not in TRACKERS]
    if not words or unknown:
        raise ValueError(f"--log-to takes {', '.join(TRACKERS)} (comma-separated), auto or none; "
                         f"got {text!r}")
    return tuple(dict.fromkeys(words))


def check_installed(log_to: str) -> None:
    """Refuse, before anything is written, a tracker ``log_to`` names that is not installed.

    Raises:
        TrackerError: one line naming the extra to install.
    """
    import importlib.util

    for name in parse_log_to(log_to):
        if name in TRACKERS and importlib.util.find_spec(name) is None:
            raise _missing(name, name)


def _missing(name: str, extra: str) -> TrackerError:
    return TrackerError(f"--log-to {name}: the {name} package is not installed; pip install "
                        f"'bigbatch[{extra}]' (or drop {name} from --log-to)")


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:300] + "…") if len(text) > 300 else text or type(err).__name__


def open_trackers(log_to: str, out: Path, params: dict[str, Any], *, purge_step: int | None,
                  resume: bool) -> list[Tracker]:
    """Open the trackers ``log_to`` names for the run folder ``out`` (rank 0 only).

    Args:
        log_to: the ``--log-to`` value.
        out: the run folder.
        params: the configuration, logged once as parameters.
        purge_step: a resumed run's first step (TensorBoard drops its events from there on).
        resume: continue the MLflow run and W&B run id recorded in ``tracking.json``.

    Raises:
        TrackerError: a named tracker is not installed or cannot be opened (one line).
    """
    names = parse_log_to(log_to)
    ids_path = out / IDS_FILE
    ids: dict[str, str] = {}
    if resume and ids_path.is_file():
        try:
            ids = json.loads(ids_path.read_text())
        except (OSError, ValueError):
            ids = {}
    opened: list[Tracker] = []
    try:
        for name in names:
            if name in ("auto", "tensorboard"):
                tb = _TensorBoard.open(out, purge_step, required=name == "tensorboard")
                if tb is not None:
                    opened.append(tb)
            elif name == "mlflow":
                opened.append(_MLflow(out, params, ids.get("mlflow")))
            elif name == "wandb":
                opened.append(_WandB(out, params, ids.get("wandb")))
    except BaseException:
        for tracker in opened:
            tracker.close(ok=False)
        raise
    new = {name: t.run_id for name, t in (("mlflow", _first(opened, _MLflow)),
                                          ("wandb", _first(opened, _WandB))) if t is not None}
    if new and new != {k: v for k, v in ids.items() if k in new}:
        ids_path.write_text(json.dumps({**ids, **new}, indent=1) + "\n")
    return opened


def _first(trackers: list[Tracker], kind: type) -> Any:
    return next((t for t in trackers if isinstance(t, kind)), None)


def _tensorboard_without_tensorflow() -> None:
    """Event files need no TensorFlow, but TensorBoard imports it whenever it is installed
    (seconds, and its logging) unless ``tensorboard.compat.notf`` exists — TensorBoard's own switch
    to its TensorFlow stub. Set that switch, unless TensorFlow is already loaded."""
    import sys
    import types

    if "tensorflow" not in sys.modules:
        sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("notf"))


class _TensorBoard:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def open(cls, out: Path, purge_step: int | None, required: bool) -> _TensorBoard | None:
        try:
            _tensorboard_without_tensorflow()
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # auto: metrics.jsonl only
            if required:
                raise _missing("tensorboard", "tensorboard") from None
            return None
        # purge_step drops events a resumed run is about to write again
        return cls(SummaryWriter(log_dir=str(out / "tb"), purge_step=purge_step))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def final(self, values: dict[str, float], step: int) -> None:
        self.scalars({f"final/{k}": v for k, v in values.items()}, step)

    def close(self, ok: bool) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, out: Path, params: dict[str, Any], run_id: str | None) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / "mlruns").absolute().as_uri()
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        if uri.startswith("file:") or "://" not in uri:  # MLflow 3: file stores are opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        self._metric = Metric
        try:
            self.client = MlflowClient(tracking_uri=uri)
            run = None
            if run_id is not None:
                try:
                    run = self.client.get_run(run_id)
                except Exception:  # gone from the store: start another
                    run = None
            if run is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "bigbatch"
                experiment = self.client.get_experiment_by_name(name)
                eid = (experiment.experiment_id if experiment is not None
                       else self.client.create_experiment(name))
                run = self.client.create_run(eid, run_name=out.absolute().name)
                self.client.log_batch(run.info.run_id, params=[
                    Param(k, str(v)) for k, v in params.items()])
            else:
                self.client.update_run(run.info.run_id, status="RUNNING")
        except Exception as err:  # the store's own error, as one line
            raise TrackerError(f"--log-to mlflow: cannot open {uri}: {_one_line(err)}") from None
        self.run_id: str = run.info.run_id

    def scalars(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, step)
                                                    for k, v in values.items()])

    def final(self, values: dict[str, float], step: int) -> None:
        self.scalars({f"final/{k}": v for k, v in values.items()}, step)

    def close(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "KILLED")


class _WandB:
    def __init__(self, out: Path, params: dict[str, Any], run_id: str | None) -> None:
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        where = Path(os.environ.get("WANDB_DIR") or out)
        where.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "bigbatch", name=out.absolute().name,
                dir=str(where), id=run_id, resume="allow" if run_id else None,
                mode=os.environ.get("WANDB_MODE") or "offline", config=params,
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        except Exception as err:
            raise TrackerError(f"--log-to wandb: cannot start a run in {where}: "
                               f"{_one_line(err)}") from None
        self.run_id: str = self.run.id

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def final(self, values: dict[str, float], step: int) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in values.items()})

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def numeric(record: dict[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of a ``metrics.jsonl`` record as tracker scalars (``kind`` and ``step``
    left out, booleans as 0/1)."""
    return {f"{prefix}{k}": float(v) for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float)) and math.isfinite(v)}
