"""What a stage is, and the one way every stage runs.

A stage kind is one module that builds a ``StageKind`` and registers it (one line in
``BUILTIN`` below, or ``EE4D_PLUGINS=package.module`` for a user's own): its settings (a
``Params`` dataclass), the kinds it reads, how it runs, what it contributes to the report and
whether it has a command of its own. The graph (``engine.graph``) and the command line plan,
fingerprint, run, record and report every kind the same way.

A stage run writes into one output folder and, last, ``stage.json`` with ``"status":
"done"``: that record is the commit marker. It is written first with ``"status":
"running"`` (the claim), so a folder never mixes two configurations: rerun with the same
fingerprint, a stage resumes in place (finished units are kept); with another, it refuses.
The claim names its run (``run_id``, host, pid) and is renewed while the work goes on, so a
second run reaching a stage that another live run is writing stops there (``StageBusy``)
instead of writing beside it; a claim whose run died (its pid is gone on this host, or it was
not renewed for LEASE_S) is taken over.

The fingerprint hashes the kind, its format version, the settings that fix its output
(``Params.identity``) and its inputs' fingerprints, so the same work has the same fingerprint
whether the graph or a command ran it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from engine import storage

RECORD = "stage.json"
LEASE_S = 60.0       # a claim not renewed for this long belongs to a run that is gone
SETTLE_S = 0.3       # two claims written at once: the later one stands, the earlier run sees it and yields
# Modules that register the built-in kinds and benchmarks, in run order.
BUILTIN = ("engine.release.stage", "engine.release.validate", "engine.shards.job", "engine.pretrain.stage",
           "engine.features.job", "engine.train.stage", "engine.pretrain.probe", "engine.graph.report")
PLUGINS_ENV = "EE4D_PLUGINS"


@dataclasses.dataclass
class Context:
    """What a stage's work may use besides its settings, inputs and output folder."""
    progress: bool = True                 # log and show progress bars
    storage_options: dict | None = None
    address: str | None = None            # Ray address for stages that need a cluster
    run_out: str | None = None            # the graph's output folder (None outside a graph)
    run_name: str = ""
    stage: str = ""                       # the stage being run, e.g. task/keystep_recognition
    records: dict[str, dict] = dataclasses.field(default_factory=dict)   # this run's records so far
    urls: dict[str, str] = dataclasses.field(default_factory=dict)       # this run's stage outputs
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])   # names its claims

    def log(self, *args, **kwargs) -> None:
        if self.progress:
            print(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class Command:
    """A stage kind's command, ``ee4d NAME ...``. By default it runs the stage on its own:
    ``ee4d NAME INPUT... OUT [--flags]`` (inputs are URLs of finished stages, optional inputs
    ``--KIND URL``, flags from the kind's params) and prints ``summary(record)``. A kind may
    instead give its own positional ``args``, flags (``params``) and ``main(args, params)``."""
    name: str
    help: str
    summary: Callable[[dict], str] | None = None
    args: tuple[tuple[str, str], ...] = ()
    main: Callable[[Any, Any], int] | None = None
    params: type | None = None


@dataclasses.dataclass(frozen=True)
class StageKind:
    name: str                             # the record's kind
    params: type                          # a Params dataclass: spec section, flags, fingerprint
    run: Callable[[Any, dict[str, str], str, Context], dict]   # (settings, input URLs, out, ctx) -> result
    inputs: tuple[str, ...] = ()          # kinds it reads; all must be in the graph
    optional_inputs: tuple[str, ...] = ()  # kinds it reads when the graph has them
    inputs_for: Callable[[Any], tuple[str, ...]] = lambda params: ()   # kinds these settings need too
    version: int = 1                      # bump when the output format changes: old outputs stop matching
    section: str = ""                     # its key in a job spec (default: the name)
    folder: str = ""                      # under the run's output (default: the name)
    needs_ray: bool = False
    help: str = ""                        # one line on what it makes (``ee4d run --dry-run`` shows it)
    # A kind with variants is a family (the benchmarks): its spec section maps each variant's
    # name to its settings (the variant's own Params class), each runs as ``<name>/<variant>``.
    variants: Callable[[], dict[str, type]] | None = None
    resources: Callable[[Any], str] = lambda params: "driver only"
    check: Callable[[Any], None] | None = None    # checks needing this machine's files (before any work)
    report: Callable[[list[dict], Context], str] | None = None   # an HTML section from its records
    rejects: Callable[[dict], list[tuple[str, str]]] | None = None   # (unit, reason) of a finished record
    command: Command | None = None
    # A kind whose output may be given rather than made (a release): where it is for these
    # settings (None: make it), and its fingerprint from what is there.
    given_url: Callable[[Any], str | None] = lambda params: None
    given: Callable[[str, dict | None], str] | None = None
    uses_all_stages: bool = False         # the report: reads every other stage of the run; runs last

    @property
    def key(self) -> str:
        return self.section or self.name


_KINDS: dict[str, StageKind] = {}
_loaded = False


def register(kind: StageKind) -> StageKind:
    if kind.name in _KINDS and _KINDS[kind.name] is not kind:
        raise ValueError(f"stage kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def kinds() -> dict[str, StageKind]:
    """Every registered kind, built-in ones first, then those of ``EE4D_PLUGINS`` modules."""
    global _loaded
    if not _loaded:
        _loaded = True
        plugins = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
        for module in BUILTIN + tuple(plugins):
            importlib.import_module(module)
    return _KINDS


def kind(name: str) -> StageKind:
    known = kinds()
    if name not in known:
        raise ValueError(f"unknown stage kind {name!r}; known: {', '.join(known)}")
    return known[name]


# ----------------------------------------------------------------------------- fingerprints, records

def fingerprint(stage_kind: StageKind, params, inputs: dict[str, str], variant: str | None = None) -> str:
    """Hash of the kind (and variant), its format version, the settings that fix its output and
    the inputs' fingerprints (input -> fingerprint)."""
    blob = json.dumps({"kind": stage_kind.name, "variant": variant, "version": stage_kind.version,
                       "params": params.identity(), "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def output_url(out: str, stage_kind: StageKind, variant: str | None, fingerprint: str) -> str:
    """Where a run rooted at ``out`` keeps a stage: ``<out>/<folder>/[<variant>/]<fingerprint>``."""
    return storage.join(out, stage_kind.folder or stage_kind.name, *([variant] if variant else []), fingerprint)


def read_record(url: str, storage_options: dict | None = None) -> dict | None:
    fs, path = storage.filesystem(url, storage_options)
    record_path = storage.join(path, RECORD)
    return storage.read_json(fs, record_path) if fs.exists(record_path) else None


def finished(url: str, kind_name: str, storage_options: dict | None = None) -> dict:
    """The record of a finished stage of ``kind_name`` at ``url``, or ValueError saying what is missing."""
    record = read_record(url, storage_options)
    if not record or record.get("status") != "done":
        command = kind(kind_name).command
        hint = f"; run `ee4d {command.name}` first" if command else ""
        raise ValueError(f"{url} holds no finished {kind_name} stage (no {RECORD} marked done){hint}")
    if record["kind"] != kind_name:
        raise ValueError(f"{url} holds a {record['kind']} stage, not {kind_name}")
    return record


def input_fingerprint(kind_name: str, url: str, storage_options: dict | None = None) -> str:
    """The fingerprint of an input: its record's, or for a given release, one from its listing."""
    record = read_record(url, storage_options)
    if record is None and kind(kind_name).given:
        return kind(kind_name).given(url, storage_options)
    if record is None:
        finished(url, kind_name, storage_options)     # raises with the reason
    return record["fingerprint"]


def upstream(url: str, kind_name: str, storage_options: dict | None = None) -> str:
    """The URL of the ``kind_name`` stage that the stage at ``url`` read, followed back through records."""
    record = read_record(url, storage_options)
    while record is not None:
        inputs = record.get("inputs", {})
        if kind_name in inputs:
            return inputs[kind_name]["url"]
        parent = next(iter(inputs.values()), None)
        record = read_record(parent["url"], storage_options) if parent else None
    raise ValueError(f"{url}: no {kind_name} stage in its lineage")


@dataclasses.dataclass
class Stage:
    """One planned stage: a kind, its settings, its inputs and where it writes."""
    name: str                             # the kind, or <kind>/<variant>
    kind: StageKind
    params: Any
    inputs: dict[str, str]                # input kind -> stage name in the graph (or a URL outside one)
    fingerprint: str
    url: str

    def record(self, status: str, input_urls: dict[str, str], input_fps: dict[str, str], **extra) -> dict:
        return {"stage": self.name, "kind": self.kind.name, "version": self.kind.version, "status": status,
                "fingerprint": self.fingerprint, "output": self.url, "config": self.params.to_json(),
                "inputs": {k: {"url": input_urls[k], "fingerprint": input_fps[k]} for k in input_urls},
                **extra}


class StageBusy(RuntimeError):
    """Another live run is writing this stage's folder."""


_HELD: dict[str, str] = {}    # record path -> run_id, for the claims this process holds now


def _claim_is_live(record: dict, record_path: str) -> bool:
    """Whether a "running" record's run may still be at work: renewed within LEASE_S and, when
    it ran on this host, its process still exists (in this process: it still holds the claim)."""
    if time.time() - float(record.get("renewed", 0)) > LEASE_S:
        return False
    if record.get("host") == socket.gethostname() and record.get("pid") == os.getpid():
        return _HELD.get(record_path) == record.get("run_id")
    if record.get("host") == socket.gethostname() and record.get("pid"):
        try:
            os.kill(int(record["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:       # another user's process: alive
            pass
    return True


def _busy(stage: Stage, record: dict) -> StageBusy:
    return StageBusy(f"{stage.name}: {stage.url} is being written by run {record.get('run_id')} "
                     f"(host {record.get('host')}, pid {record.get('pid')}); it was left to that run: "
                     "rerun when it has finished to reuse its output")


class _Claim:
    """This run's claim on a stage folder, renewed every LEASE_S / 4 until released."""

    def __init__(self, stage: Stage, fs, record_path: str, record: dict):
        self.stage, self.fs, self.record_path, self.record = stage, fs, record_path, record
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._renew, daemon=True)

    def _write(self) -> None:
        storage.write_json_atomic(self.fs, self.record_path, {**self.record, "renewed": time.time()})

    def _renew(self) -> None:
        while not self.stop.wait(LEASE_S / 4):
            try:
                self._write()
            except Exception:   # noqa: BLE001 - a missed renewal only shortens the lease
                pass

    def __enter__(self):
        self._write()
        time.sleep(SETTLE_S)
        holder = storage.read_json(self.fs, self.record_path)
        if holder.get("run_id") != self.record["run_id"]:
            raise _busy(self.stage, holder)
        _HELD[self.record_path] = self.record["run_id"]
        self.thread.start()
        return self

    def __exit__(self, *exc):
        _HELD.pop(self.record_path, None)
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join()


def execute(stage: Stage, input_urls: dict[str, str], input_fps: dict[str, str], ctx: Context,
            commit: bool = True) -> dict:
    """Claim the stage's folder, run its work, commit its record; return the record.

    A finished stage with this fingerprint is returned as it is (``status`` "reused"). A folder
    another live run has claimed raises StageBusy. A failure (or ``commit=False``) leaves the
    claim, never a done record, so a rerun redoes what is missing."""
    fs, path = storage.filesystem(stage.url, ctx.storage_options)
    record_path = storage.join(path, RECORD)
    existing = storage.read_json(fs, record_path) if fs.exists(record_path) else None
    if existing and existing.get("fingerprint") != stage.fingerprint:
        raise ValueError(f"{stage.url} holds the output of another configuration or input "
                         f"(fingerprint {existing.get('fingerprint')}, this is {stage.fingerprint}); "
                         "use a new output location")
    if existing and existing.get("status") == "done":
        return {**existing, "status": "reused"}
    if existing and existing.get("status") == "running" and existing.get("run_id") != ctx.run_id \
            and _claim_is_live(existing, record_path):
        raise _busy(stage, existing)
    owner = {"run_id": ctx.run_id, "host": socket.gethostname(), "pid": os.getpid()}
    with _Claim(stage, fs, record_path, stage.record("running", input_urls, input_fps, **owner)):
        started = time.time()
        if stage.kind.needs_ray:
            ensure_ray(ctx.address)
        result = stage.kind.run(stage.params, input_urls, stage.url, dataclasses.replace(ctx, stage=stage.name))
    record = stage.record("done", input_urls, input_fps, seconds=round(time.time() - started, 3),
                          finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), result=result,
                          run_id=ctx.run_id)
    if commit:
        storage.write_json_atomic(fs, record_path, record)
    return {**record, "status": "ran"}


def run_one(kind_name: str, params, inputs: dict[str, str], out: str, *, variant: str | None = None,
            storage_options: dict | None = None, address: str | None = None, progress: bool = True) -> dict:
    """Run one stage outside a graph: inputs are URLs by kind; returns its record."""
    stage_kind = kind(kind_name)
    inputs, out = {k: storage.absolute(url) for k, url in inputs.items()}, storage.absolute(out)
    missing = [k for k in stage_kind.inputs + stage_kind.inputs_for(params) if k not in inputs]
    if missing:
        raise ValueError(f"{kind_name}: needs input {', '.join(missing)}")
    input_fps = {k: input_fingerprint(k, url, storage_options) for k, url in inputs.items()}
    name = f"{kind_name}/{variant}" if variant else kind_name
    stage = Stage(name, stage_kind, params, dict(inputs), fingerprint(stage_kind, params, input_fps, variant),
                  out.rstrip("/"))
    ctx = Context(progress=progress, storage_options=storage_options, address=address)
    return execute(stage, dict(inputs), input_fps, ctx)


def ensure_ray(address: str | None) -> None:
    import ray
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)


def without_cpu_reservation(dataset):
    """Switch off Ray Data's per-operator resource reservation for ``dataset`` (its own context,
    not the process's). With it, a stream of 1-CPU map tasks kept only part of the CPUs busy here
    (Ray 2.60: on average 5.3 of 8, 1.2 of 2; without it 7.5 and 1.9), so the shard job wrote one
    shard at a time on 2 CPUs. Only for pipelines whose operators cannot take each other's CPUs:
    one operator, or tasks feeding actors that reserve no CPU."""
    dataset.context.op_resource_reservation_enabled = False
    return dataset
