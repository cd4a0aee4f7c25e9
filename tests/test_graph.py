"""The graph end to end: the demo spec on a local Ray, reruns that reuse stages, a malformed
spec, and the same spec submitted to a two-node cluster (killed once, then resubmitted)
through the Jobs API, whose outputs must equal the local run's."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from engine.graph import spec as specs
from engine.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]
DEMO_TASKS = ("keystep_recognition", "demonstrator_proficiency", "demonstration_proficiency",
              "procedure_understanding", "ego_body_pose", "ego_hand_pose", "online_keystep",
              "correspondence_ego_exo", "correspondence_exo_ego")
# The demo spec, shrunk: 10 takes of 4 s hold val examples for every benchmark; 4 pretraining steps.
SMALL = ["release.synth.preset=tiny", "release.synth.takes=10", "release.synth.seconds=4"] + [
    f"tasks.{t}.epochs=4" for t in DEMO_TASKS] + ["pretrain.steps=4", "probe.epochs=4"]
# Jobs on the clusters below train two benchmarks, one on features and one on frames from the
# shards; the local demo run trains them all.
CLUSTER_TASKS = ("keystep_recognition", "correspondence_ego_exo")
ONLY_CLUSTER_TASKS = [f"tasks.{t}=false" for t in DEMO_TASKS if t not in CLUSTER_TASKS] + ["probe=false"]


def cluster_part(found: dict) -> dict:
    """The outputs (or reported metrics) of a run, less the benchmarks the cluster jobs leave out."""
    return {k: v for k, v in found.items() if k.removeprefix("task/") not in DEMO_TASKS or
            k.removeprefix("task/") in CLUSTER_TASKS}


def ee4d(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, env={**env, **kwargs.pop("env", {})},
                          capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"ee4d {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def statuses(out: Path) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in json.loads((out / "run.json").read_text())["stages"]}


def outputs(out: Path) -> dict:
    """What a run produced, by content: shard samples, feature vectors, val metrics, submissions."""
    run = json.loads((out / "run.json").read_text())
    folders = {s["stage"]: Path(s["output"]) for s in run["stages"]}
    manifest = pq.read_table(folders["shard"] / "manifest.parquet").to_pydict()
    found = {"samples": dict(zip(manifest["key"], manifest["sha256"])),
             "features": {p.name: torch.load(p, weights_only=True).numpy()
                          for p in sorted(folders["features"].glob("*.pt"))}}
    for stage, folder in folders.items():
        if stage.startswith("task/"):
            found[stage] = {"val": json.loads((folder / "result.json").read_text())["val"],
                            "submission": json.loads((folder / "submission_val.json").read_text())}
    return found


def assert_close(got, expected, where="outputs"):
    """Equal structure, keys, strings and integers; floats within 1e-3 (a head trained on
    features that differ in their last bits gives the same predictions, logits equal to ~1e-5)."""
    if isinstance(expected, float):
        assert isinstance(got, (int, float)) and abs(got - expected) <= 1e-3, (where, got, expected)
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(expected), (where, sorted(got), sorted(expected))
        for k in expected:
            assert_close(got[k], expected[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), (where, got, expected)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_close(g, e, f"{where}[{i}]")
    elif isinstance(expected, np.ndarray):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=where)
    else:
        assert got == expected, (where, got, expected)


def reported_metrics(out: Path) -> dict[str, str]:
    """Benchmark -> the val metric as the report's table shows it."""
    rows = re.findall(r"<tr><td>(\w+)</td><td>([\w@.]+) \((?:higher|lower) is better\)</td><td><b>([0-9.]+)</b></td>",
                      (out / "report.html").read_text())
    return {task: f"{metric} {value}" for task, metric, value in rows}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graph") / "demo"
    proc = ee4d("run", "jobs/demo.yaml", "--out", str(out), *sets(SMALL))
    assert f"report: {out}/report.html" in proc.stdout
    return out


def test_the_demo_spec_runs_end_to_end_and_reports_every_benchmark(demo_run):
    assert set(statuses(demo_run).values()) == {"ran"}
    report = (demo_run / "report.html").read_text()
    stages_run = {s["stage"]: Path(s["output"]) for s in json.loads((demo_run / "run.json").read_text())["stages"]}
    for stage, found in outputs(demo_run).items():
        if stage.startswith("task/"):
            folder = stages_run[stage]
            result = json.loads((folder / "result.json").read_text())
            metric = result["metric"]
            assert found["val"][metric] == result["val"][metric]
            better = "higher" if TASKS[stage[5:]].maximize else "lower"
            assert f"<td>{stage[5:]}</td><td>{metric} ({better} is better)</td><td><b>{result['val'][metric]:.4f}</b></td>" \
                in report
            for name, value in result["baselines"].items():
                assert f"{name} {value:.4f}" in report
            # Links are relative to the run folder and lead to the files.
            assert f"href='{folder.relative_to(demo_run)}/submission_val.json'" in report
    assert sorted(reported_metrics(demo_run)) == sorted(DEMO_TASKS)
    # Pretraining and training curves, the strip of frames, online keystep's mcAP against power,
    # one prediction of each correspondence direction.
    assert report.count("data:image/png;base64,") == 6
    assert "<h3>correspondence_exo_ego: one val prediction</h3>" in report
    assert "<h3>online_keystep: mcAP against average power (mW)</h3>" in report
    assert "body and hand keypoints (manual annotation) and object masks" in report
    assert "<h2>Pretraining</h2>" in report and "ego&rarr;exo top-1" in report
    # The probe: its random-init side is the graph's own features and, where the settings are
    # equal, the graph's own benchmark run; its pretrained features sit where the graph keeps features.
    probe = json.loads((stages_run["probe"] / "stage.json").read_text())["result"]
    assert probe["features"]["start"] == str(stages_run["features"])
    pretrained = Path(probe["features"]["pretrained"])
    assert pretrained.parent == demo_run / "features" and pretrained != stages_run["features"]
    start_files = sorted(p.name for p in stages_run["features"].glob("*.pt"))
    assert sorted(p.name for p in pretrained.glob("*.pt")) == start_files
    a, b = (torch.load(folder / start_files[0], weights_only=True) for folder in (stages_run["features"], pretrained))
    assert a.shape == b.shape and not torch.equal(a, b)
    assert probe["tasks"]["demonstration_proficiency"]["start"][0]["output"] == \
        str(stages_run["task/demonstration_proficiency"])
    assert "<h2>Benchmarks on pretrained features</h2>" in report
    for task, runs in probe["tasks"].items():
        assert len(runs["start"]) == len(runs["pretrained"]) == 1
        assert f"<tr><td>{task}</td><td>{runs['metric']} (higher is better)</td><td>{runs['start'][0]['value']:.4f}" \
               f"</td><td><b>{runs['pretrained'][0]['value']:.4f}</b></td>" in report
    for record in json.loads((demo_run / "run.json").read_text())["stages"]:
        assert json.loads((Path(record["output"]) / "stage.json").read_text())["status"] == "done"
        assert record["stage"] == "report" or record["fingerprint"] in report


def test_a_rerun_reuses_every_stage_and_a_changed_task_reruns_only_it_and_the_report(demo_run):
    before = {p: p.stat().st_mtime_ns for p in demo_run.rglob("*") if p.is_file() and p.name != "run.json"}
    proc = ee4d("run", "jobs/demo.yaml", "--out", str(demo_run), *sets(SMALL))
    assert set(statuses(demo_run).values()) == {"reused"}, proc.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before

    changed = SMALL + ["tasks.demonstrator_proficiency.lr=0.003"]
    ee4d("run", "jobs/demo.yaml", "--out", str(demo_run), *sets(changed))
    ran = {stage for stage, status in statuses(demo_run).items() if status == "ran"}
    assert ran == {"task/demonstrator_proficiency", "report"}
    assert len(list(demo_run.glob("tasks/demonstrator_proficiency/*/stage.json"))) == 2   # the old one is kept

    ee4d("run", "jobs/demo.yaml", "--out", str(demo_run), *sets(SMALL))    # back to the first values
    assert set(statuses(demo_run).values()) == {"reused"}
    # The run folder shows the report of the stages this run used, though the report was reused.
    for record in json.loads((demo_run / "run.json").read_text())["stages"]:
        if record["stage"].startswith("task/"):
            result = json.loads((Path(record["output"]) / "result.json").read_text())
            assert reported_metrics(demo_run)[record["stage"][5:]] == \
                f"{result['metric']} {result['val'][result['metric']]:.4f}", record["stage"]


@pytest.mark.parametrize("notebook", sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb")))
def test_notebooks_execute_on_the_demo_run(demo_run, notebook, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("EE4D_RUN", str(demo_run))
    book = nbformat.read(REPO / "notebooks" / notebook, as_version=4)
    NotebookClient(book, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in outputs)


@pytest.mark.parametrize("override, message", [
    ("tasks.keystep_recognition.epochs=many", "tasks.keystep_recognition.epochs: expected an integer, got 'many'"),
    ("shard.mode=copy", "shard: mode must be one of remux, transcode, frames"),
    ("tasks.pose=1", "tasks.pose: unknown task; known: correspondence_ego_exo, correspondence_exo_ego, demonstration"),
    ("features.bacth_size=4", "features.bacth_size: unknown key; keys are"),
    ("release.url=/data/egoexo", "release: give exactly one of url"),
    ("probe.tasks=[ego_hand_pose]", "probe: ego_hand_pose does not read features"),
])
def test_a_malformed_spec_fails_at_once_naming_the_key(tmp_path, override, message):
    proc = ee4d("run", "jobs/demo.yaml", "--out", str(tmp_path / "never"), "--set", override, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "never").exists()


def test_features_of_the_graphs_own_pretrained_encoder_need_its_pretrain_stage(tmp_path):
    plan = ee4d("run", "jobs/demo.yaml", "--out", str(tmp_path / "never"), "--dry-run",
                "--set", "features.model=pretrained").stdout
    assert re.search(r"\nfeatures: run .*\n.*\n.*\n  inputs +pretrain, shard\n", plan), plan
    proc = ee4d("run", "jobs/demo.yaml", "--out", str(tmp_path / "never"), "--set", "features.model=pretrained",
                "--set", "pretrain=false", check=False)
    assert proc.returncode == 2 and "features: needs a pretrain section" in proc.stderr, proc.stderr
    assert not (tmp_path / "never").exists()


def test_every_shipped_spec_parses():
    for path in sorted((REPO / "jobs").glob("*.yaml")):
        spec = specs.load(str(path), local=False)
        assert spec.sections["tasks"] and "report" in spec.sections, path


def test_a_benchmark_set_to_false_leaves_the_graph():
    spec = specs.load(str(REPO / "jobs" / "demo.yaml"), ["tasks.ego_hand_pose=false", "pretrain=false", "probe=false"],
                      local=False)
    assert sorted(spec.sections["tasks"]) == sorted(set(DEMO_TASKS) - {"ego_hand_pose"})
    assert "pretrain" not in spec.sections


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(pattern: str) -> set:
    """The live processes whose command line matches ``pattern``, and their descendants (Ray's
    workers and agents rename themselves)."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        if re.search(pattern, " ".join(proc.info["cmdline"] or [])):
            found |= {proc, *proc.children(recursive=True)}
    return {p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE}


def _cluster_processes(port: str) -> set:
    """The processes of cluster/local.sh's cluster on ``port``: those naming its node folders or
    its head's address."""
    return _processes(f"ray-ee4d-(head|worker)-{port}|--address=\\S*:{port} ")


def _still_running(procs: set) -> list:
    """Those of ``procs`` that have not ended within a few seconds (an exited process waiting
    for its parent to reap it has ended)."""
    import psutil

    _, alive = psutil.wait_procs(list(procs), timeout=15)
    running = []
    for proc in alive:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                running.append(proc)
        except psutil.NoSuchProcess:
            pass
    return running


@pytest.fixture
def local_cluster(tmp_path):
    """The two-node cluster of cluster/local.sh (head and worker, one CPU each, token auth),
    started from an empty HOME, as on a machine that never ran Ray; an unrelated local Ray runs
    beside it and must survive its stop."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "EE4D_RAY_PORT": str(_free_port()), "EE4D_DASHBOARD_PORT": str(_free_port())}
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import ray, time; ray.init(num_cpus=1, include_dashboard=False); "
                               "print('up', flush=True); time.sleep(3600)"],
        env={**env, "RAY_AUTH_MODE": "disabled"}, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert bystander.stdout.readline().strip() == "up"
    started = subprocess.run(["cluster/local.sh", "start"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=180)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"created the authentication token {home}/.ray/auth_token" in started.stdout
    try:
        yield f"http://127.0.0.1:{env['EE4D_DASHBOARD_PORT']}", {"RAY_AUTH_MODE": "token", "HOME": str(home)}
    finally:
        before = _cluster_processes(env["EE4D_RAY_PORT"])
        stopped = subprocess.run(["cluster/local.sh", "stop"], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=120)
        ours = _still_running(before)
        alive = bystander.poll() is None
        os.killpg(bystander.pid, signal.SIGKILL)
        bystander.wait()
    assert stopped.returncode == 0 and "stopped the cluster" in stopped.stdout, stopped.stdout + stopped.stderr
    assert len(before) >= 4 and not ours and alive, (before, ours, alive)


def test_local_sh_prints_its_usage_and_refuses_unknown_commands():
    shown = subprocess.run(["cluster/local.sh", "--help"], cwd=REPO, capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout.startswith("A two-node Ray cluster on this machine")
    assert "set -euo" not in shown.stdout and "cluster/local.sh stop" in shown.stdout
    wrong = subprocess.run(["cluster/local.sh", "launch"], cwd=REPO, capture_output=True, text=True)
    assert wrong.returncode == 2 and "cluster/local.sh start" in wrong.stderr


def test_submitted_to_a_two_node_cluster_killed_and_resubmitted_it_matches_the_local_run(
        demo_run, local_cluster, tmp_path):
    local_cluster, auth = local_cluster
    out = tmp_path / "submitted"
    release = next(demo_run.glob("release/*/takes.json")).parent
    args = sets(SMALL + ONLY_CLUSTER_TASKS + [f"release.url={release}", "release.synth=null"])
    # Stop the job once features are partly written: a process already connected to the Jobs
    # API watches for the first feature file and stops the job at once (the stage takes seconds).
    watcher = subprocess.Popen([sys.executable, "-c", f"""
import glob, sys, time
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient({local_cluster!r})
print("watching", flush=True)
deadline = time.time() + 300
while not glob.glob({str(out / "features" / "*" / "*.pt")!r}) and time.time() < deadline:
    time.sleep(0.02)
sys.exit(0 if client.stop_job("first") else 1)
"""], env={**os.environ, **auth}, stdout=subprocess.PIPE, text=True)
    assert watcher.stdout.readline().strip() == "watching"
    first = ee4d("submit", "jobs/demo.yaml", "--address", local_cluster, "--out", str(out), "--job-id", "first",
                 *args, env=auth)
    assert "submitted first" in first.stdout
    assert watcher.wait(timeout=320) == 0, ee4d("logs", "first", "--address", local_cluster, env=auth).stdout
    stopped = ee4d("stop", "first", "--address", local_cluster, env=auth)     # waits for the job to end
    assert "first: STOPPED" in stopped.stdout
    assert not (out / "run.json").exists()
    assert "first: STOPPED" in ee4d("status", "first", "--address", local_cluster, env=auth).stdout

    second = ee4d("submit", "jobs/demo.yaml", "--address", local_cluster, "--out", str(out), "--job-id", "second",
                  "--wait", *args, env=auth)
    assert "second: SUCCEEDED" in second.stdout
    assert "features: done before" not in second.stdout and "shard: done before, reused" in second.stdout
    logs = ee4d("logs", "second", "--address", local_cluster, env=auth).stdout
    # The feature stage found the take views the first job had finished, and kept them.
    assert int(re.search(r"(\d+) take views already written", logs).group(1)) > 0, logs
    # Feature vectors of take views embedded in other batches than the local run's may differ in
    # their last float bits, and so may logits: samples, keys and labels are identical, numbers agree.
    assert_close(outputs(out), cluster_part(outputs(demo_run)))
    assert reported_metrics(out) == cluster_part(reported_metrics(demo_run))
    nodes = json.loads(next(out.glob("shards/*/stage.json")).read_text())["result"]["nodes"]
    assert len(nodes) == 2               # shards were written on both nodes


# Node types shaped like cluster/aws.yaml's: a head that runs no tasks, and CPU and GPU workers
# that scale from zero. The GPU type's "GPU" is only a resource here (torch runs on the CPU).
AUTOSCALING_NODE_TYPES = {
    "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
    "ray.worker.cpu": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 3},
    "ray.worker.gpu": {"resources": {"CPU": 2, "GPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1},
}


@pytest.fixture
def autoscaling_cluster():
    """An autoscaling cluster on Ray's fake multi-node provider: the autoscaler starts and stops
    each worker node as a local raylet, as it would launch and terminate instances."""
    port, dashboard = _free_port(), _free_port()
    # Short: the nodes' socket paths live under it.
    temp = tempfile.mkdtemp(prefix="ray-ee4d-fake-")
    config = {
        "cluster_name": "ee4d-fake", "max_workers": 4, "upscaling_speed": 2.0, "idle_timeout_minutes": 0.25,
        "provider": {"type": "fake_multinode", "gcs_address": f"127.0.0.1:{port}", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "head_node_type": "ray.head.default", "available_node_types": AUTOSCALING_NODE_TYPES,
        "auth": {"ssh_user": "ray"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": []}
    config_path = Path(temp) / "autoscaling.json"
    config_path.write_text(json.dumps(config))
    auth = {"RAY_AUTH_MODE": "disabled"}
    env = {**os.environ, **auth, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started = subprocess.run(
        ["ray", "start", "--head", f"--autoscaling-config={config_path}", "--port", str(port), "--num-cpus", "0",
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--temp-dir", temp,
         "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield f"http://127.0.0.1:{dashboard}", auth
    finally:
        ours = _processes(f"{temp}|--address=\\S*:{port} ")
        for proc in ours:
            proc.kill()
        _still_running(ours)
        shutil.rmtree(temp, ignore_errors=True)


def _nodes(address: str) -> dict[str, dict]:
    """Every node the cluster has had, alive or not: node id -> state and total resources."""
    from ray.util.state import list_nodes

    return {n.node_id: {"state": n.state, "resources": n.resources_total, "head": n.is_head_node}
            for n in list_nodes(address=address, detail=True, limit=1000, raise_on_missing_output=False)}


def test_on_an_autoscaling_cluster_shards_run_on_cpu_nodes_and_models_on_gpu_nodes_that_scale_from_zero(
        demo_run, autoscaling_cluster, tmp_path):
    from ray.util.state import list_actors

    address, auth = autoscaling_cluster
    assert [n["head"] for n in _nodes(address).values() if n["state"] == "ALIVE"] == [True]    # no workers yet
    out = tmp_path / "autoscaled"
    release = next(demo_run.glob("release/*/takes.json")).parent
    tasks = [f"tasks.{t}.use_gpu=false" for t in CLUSTER_TASKS] + ONLY_CLUSTER_TASKS
    small = [s for s in SMALL if not s.startswith("pretrain.")]
    # The GPU type joins only when the model's actors ask for it; two actors share its one GPU.
    args = sets(small + tasks + [f"release.url={release}", "release.synth=null", "pretrain=false",
                                 "features.use_gpu=true", "features.gpus_per_actor=0.5", "features.actors=2"])
    # The code in place on every node, as an image from cluster/Dockerfile has it. (An uploaded
    # working dir would not do here: the fake nodes share one session folder, and each node that
    # joins unpacks the upload again into it, under the feet of the workers already running.)
    submitted = ee4d("submit", "jobs/demo.yaml", "--address", address, "--out", str(out), "--job-id", "scaled",
                     "--working-dir", f"local://{REPO}", "--wait", *args, env=auth, timeout=900)
    assert "scaled: SUCCEEDED" in submitted.stdout, submitted.stdout[-3000:]
    assert_close(outputs(out), cluster_part(outputs(demo_run)))

    nodes = _nodes(address)
    gpu_nodes = {i for i, n in nodes.items() if n["resources"].get("GPU")}
    cpu_nodes = {i for i, n in nodes.items() if not n["head"] and i not in gpu_nodes}
    shard_nodes = set(json.loads(next(out.glob("shards/*/stage.json")).read_text())["result"]["nodes"])
    assert shard_nodes and shard_nodes <= cpu_nodes, (shard_nodes, nodes)
    embedders = [a for a in list_actors(address=address, detail=True, limit=10000, raise_on_missing_output=False)
                 if "Embedder" in a.class_name]
    # Every one that was placed (one Ray Data asked for and then dropped may never be) ran there.
    placed = {a.node_id for a in embedders if a.node_id}
    assert placed and placed <= gpu_nodes, (embedders, nodes)
    assert all(a.required_resources.get("GPU") == 0.5 for a in embedders), embedders

    # Idle workers go away again: back to the head alone.
    deadline = time.time() + 120
    while [i for i, n in _nodes(address).items() if n["state"] == "ALIVE" and not n["head"]] \
            and time.time() < deadline:
        time.sleep(2)
    assert [n["head"] for n in _nodes(address).values() if n["state"] == "ALIVE"] == [True]


PLUGIN = {"EE4D_PLUGINS": "toy_plugin", "PYTHONPATH": str(REPO / "tests")}


def test_a_stage_kind_and_a_benchmark_from_a_plugin_module_join_the_spec_cli_graph_and_report(demo_run):
    """tests/toy_plugin.py adds a stage kind and a benchmark; nothing in engine/ names them."""
    assert "sample-count" in ee4d("--help", env=PLUGIN).stdout
    assert "sample-count" not in ee4d("--help").stdout
    help_text = ee4d("sample-count", "--help", env=PLUGIN).stdout
    assert "--by {split,take_uid}" in help_text and "what to count samples by" in help_text
    assert "--pooling {mean,max}" in ee4d("train", "scenario_recognition", "--help", env=PLUGIN).stdout

    bad = ee4d("run", "jobs/demo.yaml", "--out", str(demo_run), *sets(SMALL + ["sample_count.by=scene"]),
               env=PLUGIN, check=False)
    assert bad.returncode == 2 and "sample_count: by must be one of split, take_uid, got 'scene'" in bad.stderr

    toys = SMALL + ["sample_count.by=split", "tasks.scenario_recognition.epochs=3",
                    "tasks.scenario_recognition.pooling=max"]
    plan = ee4d("run", "jobs/demo.yaml", "--out", str(demo_run), "--dry-run", *sets(toys), env=PLUGIN).stdout
    assert "sample_count: run" in plan and "task/scenario_recognition: run" in plan and "shard: reuse" in plan
    ee4d("run", "jobs/demo.yaml", "--out", str(demo_run), *sets(toys), env=PLUGIN)
    ran = {stage for stage, status in statuses(demo_run).items() if status == "ran"}
    assert ran == {"sample_count", "task/scenario_recognition", "report"}
    counts = json.loads(next(demo_run.glob("sample_count/*/counts.json")).read_text())
    manifest = pq.read_table(next(demo_run.glob("shards/*/manifest.parquet"))).to_pydict()
    assert counts == {s: manifest["split"].count(s) for s in set(manifest["split"])}
    report = (demo_run / "report.html").read_text()
    assert "<h2>Sample counts</h2>" in report and "<td>scenario_recognition</td><td>top1 (higher is better)</td>" in report

    # A setting that only changes speed keeps the fingerprint; one that fixes the output does not.
    ee4d("run", "jobs/demo.yaml", "--out", str(demo_run), *sets(toys + ["sample_count.verbose=true"]), env=PLUGIN)
    assert set(statuses(demo_run).values()) == {"reused"}
    ee4d("run", "jobs/demo.yaml", "--out", str(demo_run), *sets(toys + ["sample_count.by=take_uid"]), env=PLUGIN)
    assert {s for s, status in statuses(demo_run).items() if status == "ran"} == {"sample_count", "report"}

    ee4d("run", "jobs/demo.yaml", "--out", str(demo_run), *sets(SMALL))    # the demo's own run again
    assert set(statuses(demo_run).values()) == {"reused"}
