"""Storage as fsspec URLs: a local path or ``s3://bucket/prefix`` everywhere.

S3 settings come from the usual AWS environment variables (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``) or from explicit
``storage_options`` passed through to the filesystem.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from engine.errors import StorageFault, passing_fault


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a URL; the path has no protocol and no trailing slash."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options and "endpoint_url" not in options.get("client_kwargs", {}):
            options["endpoint_url"] = endpoint
        _stop_io_thread_at_exit()
    fs, path = url_to_fs(url, **options)
    return fs, path.rstrip("/") or path


@functools.cache
def _stop_io_thread_at_exit() -> None:
    atexit.register(_stop_io_thread)


def _stop_io_thread() -> None:
    """Close S3 sessions and stop fsspec's IO thread while the interpreter is still whole.

    s3fs runs its requests on a daemon event-loop thread; a daemon thread still running C code
    while the interpreter finalizes is a classic way for a process to crash on its way out.
    """
    import fsspec.asyn

    loop, thread = fsspec.asyn.loop[0], fsspec.asyn.iothread[0]
    if loop is None or not loop.is_running():
        return
    try:
        import s3fs
        for fs in list(s3fs.S3FileSystem._cache.values()):
            if getattr(fs, "_s3", None) is not None:
                fsspec.asyn.sync(loop, fs._s3.__aexit__, None, None, None, timeout=5)
                fs._s3 = None
        s3fs.S3FileSystem.clear_instance_cache()
        fsspec.asyn.sync(loop, loop.shutdown_default_executor, timeout=5)
    except Exception:   # noqa: BLE001 - best effort on the way out; stopping the loop matters most
        pass
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)


@contextlib.contextmanager
def faults_named(url: str):
    """A passing storage fault raised inside (one that outlived the client's retries) leaves as a
    StorageFault naming ``url``: the fault is then the unit's, never a verdict on its data."""
    try:
        yield
    except StorageFault:
        raise
    except Exception as e:
        cause = passing_fault(e)
        if cause is None:
            raise
        raise StorageFault.at(url, cause) from e


def url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` of ``fs`` as a URL, for messages."""
    return path if is_local(fs) else f"{fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]}://{path}"


def url_of(f) -> str:
    """The URL of an fsspec file object (or a path as given), for messages."""
    if isinstance(f, str):
        return f
    path, fs = getattr(f, "path", None), getattr(f, "fs", None)
    if path is None:
        return repr(f)
    return path if fs is None else url(fs, path)


def absolute(url: str) -> str:
    """A local path made absolute (records name their inputs and outputs from any cwd); URLs as given."""
    return url if "://" in url else os.path.abspath(url)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with faults_named(url(fs, path)), fs.open(path, "rb") as f:
        return json.load(f)


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write so that ``path`` is either absent or complete.

    Local: write a temporary sibling, then rename. Object stores: one PUT is atomic.
    """
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with faults_named(url(fs, path)):
            fs.pipe_file(path, data)


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, json.dumps(obj, indent=1).encode())

