"""One error policy for per-unit work (a take, a take view, a shard).

A ``ContentError`` is a fault in the data itself (a corrupt video, a missing view, a malformed
entry): it rejects the unit it touches, with its reason, and the other units go on. A
``StorageFault`` is storage that kept failing on one object after the client's own retries (a
reset connection, a timeout, throttling, a 5xx): it says nothing about the data, so it never
rejects anything; Ray Data runs the unit again, and if it still fails the stage fails without
committing and a rerun completes it. Anything else (a lost worker, a bug) propagates too.
"""
from __future__ import annotations

import errno
import re

# In every StorageFault's message: Ray Data retries map tasks whose error message holds it.
STORAGE_FAULT = "storage kept failing"
MAP_RETRIES = 2

# s3fs turns S3's answers into OSErrors: 503 SlowDown / ServiceUnavailable -> EBUSY, 500 -> EREMOTEIO.
_PASSING_ERRNOS = {errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                   errno.ECONNREFUSED, errno.EPIPE, errno.EAGAIN}
# Client errors that mean the connection, not the object, failed (named, so none is imported here).
_PASSING_TYPES = {"botocore.exceptions.HTTPClientError", "botocore.exceptions.ConnectionError",
                  "aiohttp.client_exceptions.ClientConnectionError", "aiohttp.client_exceptions.ClientPayloadError",
                  "fsspec.exceptions.FSTimeoutError", "asyncio.exceptions.TimeoutError"}
_PASSING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                  "ServiceUnavailable"}


class ContentError(Exception):
    """The data of one unit is bad; the message says which and why."""


class StorageFault(Exception):
    """Storage kept failing on the object the message names, after the client's retries."""

    @classmethod
    def at(cls, url: str, cause: BaseException) -> StorageFault:
        return cls(f"{url}: {STORAGE_FAULT} ({type(cause).__name__}: {cause})")


def _causes(exc: BaseException | None):
    """``exc`` and the exceptions behind it (``cause``: how Ray's task errors hold theirs)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__


def _is_passing(exc: BaseException) -> bool:
    if isinstance(exc, (StorageFault, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _PASSING_ERRNOS:
        return True
    if {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__} & _PASSING_TYPES:
        return True
    response = getattr(exc, "response", None)     # botocore's ClientError, untranslated
    return isinstance(response, dict) and (
        response.get("Error", {}).get("Code") in _PASSING_CODES
        or response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500)


def passing_fault(exc: BaseException | None) -> BaseException | None:
    """The passing storage fault in ``exc`` or its chain of causes, or None."""
    return next((e for e in _causes(exc) if _is_passing(e)), None)


def storage_fault(exc: BaseException) -> StorageFault | None:
    """The StorageFault behind ``exc``, or None. Ray Data hands the driver a task's error as
    text (its traceback), not as a chain of exceptions, so the text is searched too."""
    for e in _causes(exc):
        if type(e) is StorageFault:
            return e
        found = re.search(rf"StorageFault: (.*{STORAGE_FAULT}.*)", str(e))
        if found:
            return StorageFault(found.group(1))
    return None


def retry_storage_faults(data_context) -> None:
    """Make Ray Data run a map task again when it failed on a StorageFault (and on nothing else)."""
    data_context.retried_map_errors = [STORAGE_FAULT]
    data_context.max_map_retries = MAP_RETRIES
