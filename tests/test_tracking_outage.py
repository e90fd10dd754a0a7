"""Tracking outages do not kill training: the session's real `mlflow server` (conftest) is stopped mid-run, by its
PID, and started again on the same port and store. While it is away the Tracker's writes return at once and
wait in its spool; once it answers they reach the run with their original steps and timestamps. A run that ends
during the outage keeps its spool, and `replay_spool` sends it later."""

from __future__ import annotations

import json
import logging
import time

import mlflow
import numpy as np
import pytest
from mlflow.entities import Param
from mlflow.exceptions import MlflowException

from umo.tracking import Tracker, append_record, is_transient, read_spool, replay_spool

EXPERIMENT = "umo-test-tracking-outage"  # this module's own (the server is the session's)


def timed(call, *args, **kwargs) -> float:
    """Seconds `call` took (it must not raise)."""
    started = time.monotonic()
    call(*args, **kwargs)
    return time.monotonic() - started


@pytest.mark.slow
def test_training_survives_a_server_outage(mlflow_service, tmp_path, caplog):
    """One outage, two runs: `train` goes on through it and catches up when the server is back; `crashed` ends
    during it (its process stops) and its spool is replayed afterwards with replay_spool."""
    caplog.set_level(logging.INFO, logger="umo.tracking")
    server = mlflow_service
    train = Tracker(uri=server.uri, experiment=EXPERIMENT, run_name="train", spool=tmp_path / "train.jsonl",
                    probe_every=0.5)
    crashed = Tracker(uri=server.uri, experiment=EXPERIMENT, run_name="crashed", spool=tmp_path / "crashed.jsonl")
    for step in (1, 2):
        train.log_metrics({"loss": 1.0 / step, "lr": 1e-4}, step)
    artifact = tmp_path / "train_metrics.json"
    artifact.write_text(json.dumps({"step": 5}))

    server.stop()
    try:
        took = [timed(train.log_metrics, {"loss": 1.0 / step, "lr": 1e-4}, step) for step in (3, 4, 5)]
        took += [timed(train.log_params, {"train.learning_rate": 1e-4, "data.samples": 12}),
                 timed(train.set_tags, {"umo.phase": "outage"}),
                 timed(train.log_image, np.full((8, 8, 3), 200, np.uint8), key="samples/grid", step=5),
                 timed(train.log_artifact, artifact),
                 timed(crashed.log_metrics, {"loss": 0.5}, 1),
                 timed(crashed.end, "FAILED")]
        assert max(took) < 15, took
        artifact.write_text("changed after it was logged")  # the spool holds the file as it was logged
        records = read_spool(train.spool)
        assert [r["op"] for r in records] == ["metrics"] * 3 + ["params", "tags", "image", "artifact"]
        assert train.pending == 7 and crashed.pending == 2
        spooled = {row[3]: row[2] for r in records if r["op"] == "metrics" for row in r["metrics"]}
        image_ts = records[5]["timestamp"]
        assert [r["op"] for r in read_spool(crashed.spool)] == ["metrics", "end"]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and str(train.spool) in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]  # one when the outage began, not one per call
    finally:
        server.start()

    time.sleep(0.5)  # the next probe is due
    train.log_metrics({"loss": 1.0 / 6, "lr": 1e-4}, 6)  # probes, replays the spool, then logs step 6
    assert train.pending == 0 and not train.spool.exists() and not (tmp_path / "train.files").exists()
    assert sum(r.levelno == logging.INFO and "answers again" in r.getMessage() for r in caplog.records) == 1
    train.end()
    assert replay_spool(server.uri, crashed.spool) == 0 and not crashed.spool.exists()

    client = mlflow.MlflowClient(tracking_uri=server.uri)
    history = sorted(client.get_metric_history(train.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4, 5, 6]  # each once: nothing lost, nothing doubled
    assert all(m.timestamp == spooled[m.step] for m in history if m.step in spooled)
    assert [m.step for m in client.get_metric_history(train.run_id, "lr")] == [1, 2, 3, 4, 5, 6]
    run = client.get_run(train.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.learning_rate": "0.0001", "data.samples": "12"}
    assert run.data.tags["umo.phase"] == "outage"
    images = [f.path for f in client.list_artifacts(train.run_id, "images")]
    assert any(p.startswith(f"images/samples~grid+step+5+timestamp+{image_ts}+") for p in images), images
    logged = client.download_artifacts(train.run_id, "train_metrics.json", str(tmp_path / "download"))
    assert json.loads(open(logged).read()) == {"step": 5}
    crashed_run = client.get_run(crashed.run_id)
    assert crashed_run.info.status == "FAILED" and crashed_run.data.metrics == {"loss": 0.5}


def test_refusals_raise_and_are_not_spooled(mlflow_server, tmp_path):
    """A 4xx is the request's fault, not an outage: MLflow's refusal of a changed param is not transient, and a
    write to a deleted run raises from the Tracker with nothing spooled."""
    tracker = Tracker(uri=mlflow_server, experiment=EXPERIMENT, run_name="refused", spool=tmp_path / "s.jsonl")
    tracker.log_params({"lr": 1})
    tracker.log_params({"lr": 2})  # a key the run has is skipped, as before
    with pytest.raises(MlflowException) as changed:
        tracker.client.log_batch(tracker.run_id, params=[Param("lr", "2")])
    assert changed.value.get_http_status_code() == 400 and not is_transient(changed.value)
    tracker.client.delete_run(tracker.run_id)
    with pytest.raises(MlflowException, match="active"):
        tracker.log_metrics({"loss": 1.0}, 1)
    assert tracker.pending == 0 and not tracker.spool.exists()


def test_a_resumed_run_replays_its_leftover_spool(mlflow_server, tmp_path, caplog):
    """The spool an earlier process left (it ended FAILED during an outage, and died writing a last line) is
    replayed when the run resumes, before the run is RUNNING again; a record MLflow refuses is dropped, loudly."""
    first = Tracker(uri=mlflow_server, experiment=EXPERIMENT, run_name="resumed", spool=tmp_path / "run.jsonl")
    first.log_metrics({"loss": 1.0}, 1)
    for record in ({"op": "metrics", "metrics": [["loss", 0.5, 1_700_000_000_000, 2]]},
                   {"op": "tags", "tags": {"k" * 300: "a key longer than MLflow takes"}},
                   {"op": "end", "status": "FAILED", "end_time": 1_700_000_000_001}):
        append_record(first.spool, {"run_id": first.run_id, **record})
    with open(first.spool, "a") as f:
        f.write('{"run_id": "cut sh')
    resumed = Tracker(uri=mlflow_server, experiment=EXPERIMENT, run_id=first.run_id, spool=first.spool)
    assert resumed.pending == 0 and not first.spool.exists()
    assert any(r.levelno == logging.ERROR and "refused a spooled tags record" in r.getMessage()
               for r in caplog.records)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    history = sorted(client.get_metric_history(first.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)] and history[1].timestamp == 1_700_000_000_000
    assert client.get_run(first.run_id).info.status == "RUNNING"
    assert resumed.last_step("loss") == 2
