"""One error policy for per-unit work (a take, a take view, a shard).

A ``ContentError`` is a fault in the data itself (a corrupt video, a missing view, a malformed
entry): it rejects the unit it touches, with its reason, and the other units go on. Anything
else (a network error, a lost worker, a bug) propagates, so Ray's retries and the stage's
failure handling see it: the stage fails without committing, and a rerun completes it.
"""


class ContentError(Exception):
    """The data of one unit is bad; the message says which and why."""
