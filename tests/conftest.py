"""Shared fixtures: miniature releases generated once per session, a loopback S3 server."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.miniature import synth

# Scenarios of the learnability release: procedural ones carry keystep labels.
PROCEDURAL = ["Cooking", "Health", "Bike Repair"]
# and physical ones demonstration proficiency.
PHYSICAL = ["Music", "Basketball", "Rock Climbing", "Soccer", "Dance"]


@pytest.fixture(scope="session")
def default_release(tmp_path_factory) -> Path:
    """The README's demo release: the default preset, seed 0."""
    root = tmp_path_factory.mktemp("default") / "release"
    synth.generate(root, preset="default", seed=0)
    return root


@pytest.fixture(scope="session")
def faults_release(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "release"
    synth.generate(root, preset="tiny", takes=5, seconds=2.0, seed=1, faults=True)
    return root


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory) -> Path:
    """A small clean release that tests may copy and damage."""
    root = tmp_path_factory.mktemp("tiny") / "release"
    synth.generate(root, preset="tiny", takes=3, seconds=2.0, seed=2)
    return root


@pytest.fixture(scope="session")
def learn_release(tmp_path_factory) -> Path:
    """Enough procedural takes for a trivial classifier to show the labels are learnable."""
    root = tmp_path_factory.mktemp("learn") / "release"
    synth.generate(root, preset="tiny", takes=20, seconds=7.0, seed=3, scenarios=PROCEDURAL)
    return root


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for a test module (the two-node tests start and stop their own cluster)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, log_to_driver=False, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def physical_release(tmp_path_factory) -> Path:
    """Physical takes long enough to hold several demonstration events each."""
    root = tmp_path_factory.mktemp("physical") / "release"
    synth.generate(root, preset="tiny", takes=10, seconds=12.0, seed=4, scenarios=PHYSICAL)
    return root


@pytest.fixture
def damaged(tiny_release, tmp_path) -> Path:
    """A private copy of the tiny release to break."""
    root = tmp_path / "release"
    shutil.copytree(tiny_release, root)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moto_server(port: int) -> subprocess.Popen:
    """moto's S3 server on loopback at ``port``, once it accepts connections."""
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto_server did not start")


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback, with the AWS variables s3fs reads."""
    port = _free_port()
    proc = moto_server(port)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=10)
