"""Two runs on one output: a stage another live run is writing is left to it, a claim whose run
is gone is taken over, and records name the run that made them."""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine import params as P
from engine import stage as stages

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Nothing(P.Params):
    """No settings."""


def _stage(out: Path, run) -> stages.Stage:
    kind = stages.StageKind(name="waiter", params=Nothing, run=run)
    params = Nothing()
    return stages.Stage("waiter", kind, params, {}, stages.fingerprint(kind, params, {}), str(out))


def _record(out: Path) -> dict:
    return json.loads((out / stages.RECORD).read_text())


def test_a_stage_another_live_run_is_writing_is_left_to_it_then_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "LEASE_S", 0.4)        # renewals every 0.1 s: the claim must stay live
    release = threading.Event()
    started = threading.Event()

    def wait(params, inputs, out, ctx):
        started.set()
        release.wait(10)
        return {"made_by": ctx.run_id}

    out = tmp_path / "stage"
    first, second = stages.Context(progress=False), stages.Context(progress=False)
    results = {}
    worker = threading.Thread(target=lambda: results.update(first=stages.execute(_stage(out, wait), {}, {}, first)))
    worker.start()
    assert started.wait(10)
    time.sleep(1.0)                                     # past the lease: only renewals keep it live
    with pytest.raises(stages.StageBusy, match=f"waiter: {out} is being written by run {first.run_id}"):
        stages.execute(_stage(out, wait), {}, {}, second)
    release.set()
    worker.join(10)
    assert results["first"]["status"] == "ran" and _record(out)["run_id"] == first.run_id
    again = stages.execute(_stage(out, wait), {}, {}, second)
    assert again["status"] == "reused" and again["run_id"] == first.run_id and again["result"]["made_by"] == first.run_id


def _claim(out: Path, **owner) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stage = _stage(out, None)
    (out / stages.RECORD).write_text(json.dumps(stage.record("running", {}, {}, run_id="gone", **owner)))


def test_a_failed_run_in_this_process_leaves_a_claim_the_next_run_takes_over(tmp_path):
    def fail(params, inputs, out, ctx):
        raise RuntimeError("broken")

    out = tmp_path / "stage"
    with pytest.raises(RuntimeError, match="broken"):
        stages.execute(_stage(out, fail), {}, {}, stages.Context(progress=False))
    assert _record(out)["status"] == "running"             # the claim stays: nothing is committed
    rerun = stages.Context(progress=False)
    assert stages.execute(_stage(out, lambda *a: {}), {}, {}, rerun)["status"] == "ran"
    assert _record(out)["run_id"] == rerun.run_id


def test_a_claim_whose_run_is_gone_is_taken_over(tmp_path):
    done = []

    def work(params, inputs, out, ctx):
        done.append(ctx.run_id)
        return {}

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    cases = {"dead pid here": dict(host=here, pid=dead.pid, renewed=time.time()),
             "not renewed": dict(host="elsewhere", pid=1, renewed=time.time() - 2 * stages.LEASE_S),
             "live elsewhere": dict(host="elsewhere", pid=1, renewed=time.time())}
    for name, owner in cases.items():
        out = tmp_path / name.replace(" ", "_")
        _claim(out, **owner)
        ctx = stages.Context(progress=False)
        if name == "live elsewhere":
            with pytest.raises(stages.StageBusy, match="run gone .host elsewhere, pid 1."):
                stages.execute(_stage(out, work), {}, {}, ctx)
            assert _record(out)["run_id"] == "gone"          # its claim is left as it was
        else:
            assert stages.execute(_stage(out, work), {}, {}, ctx)["status"] == "ran", name
            assert _record(out)["status"] == "done" and _record(out)["run_id"] == ctx.run_id
    assert len(done) == 2


def test_two_shard_commands_on_one_output_one_writes_the_other_says_who(tiny_release, tmp_path):
    out = tmp_path / "shards"
    env = dict(os.environ)
    command = [sys.executable, "-m", "engine", "shard", str(tiny_release), str(out)]
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (out / stages.RECORD).exists() and time.time() < deadline:
        time.sleep(0.05)
    claim = _record(out)
    assert claim["status"] == "running" and claim["pid"] == first.pid
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 1, second.stderr[-2000:]
    assert f"is being written by run {claim['run_id']}" in second.stderr and f"pid {first.pid}" in second.stderr
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    assert _record(out)["status"] == "done" and _record(out)["run_id"] == claim["run_id"]
    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and _record(out)["run_id"] == claim["run_id"], rerun.stderr[-2000:]
