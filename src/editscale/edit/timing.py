"""Seconds per phase of an edit (keys, optimize), for the edit chain's per-edit log."""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import torch




# Seconds spent per phase of an edit ("keys": key / module-input computation, "optimize": the
# value or weight optimization), accumulated until the caller resets it. The edit chain logs them
# per edit; the remainder of an edit's time is the closed-form update.
PHASE_SECONDS: Counter = Counter()
_active_phase: list[str] = []


@contextlib.contextmanager
def phase(name: str):
    """Count the time inside the block towards PHASE_SECONDS[name]; nested phases count towards
    the outermost one only (compute_keys calls module_io_at_subject)."""
    if _active_phase:
        yield
        return
    _active_phase.append(name)
    _sync_device()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _sync_device()
        PHASE_SECONDS[name] += time.perf_counter() - t0
        _active_phase.pop()


def _sync_device() -> None:
    """Wait for queued GPU work, so that a phase's seconds are its own (CUDA kernels run
    asynchronously: without this, one phase's kernels would be timed in the next)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
