"""Atomic writes, hashing and provenance shared by every stage.

Every output is written to a temporary file beside its destination, fsynced and renamed, so an
interrupted job never leaves a file that looks finished (Snakemake judges completeness by
existence).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from . import __version__


class EditscaleError(Exception):
    """A user-facing error: the message names the bad input (config key, file, module)."""


class Problems:
    """The errors of independent checks gathered into one, so that a file with three problems is
    fixed in one go rather than in three runs:

        problems = Problems()
        for run in runs:
            with problems.check():
                check_run(run)
        problems.raise_all()
    """

    def __init__(self) -> None:
        self.messages: list[str] = []

    @contextlib.contextmanager
    def check(self) -> Iterator[None]:
        try:
            yield
        except EditscaleError as exc:
            self.messages += getattr(exc, "problems", None) or [str(exc)]  # another Problems' error: its problems, flat

    def raise_all(self) -> None:
        """One EditscaleError: the problem itself when there is one, else the count and each on its line."""
        if len(self.messages) == 1:
            raise EditscaleError(self.messages[0])
        if self.messages:
            exc = EditscaleError(f"{len(self.messages)} problems:\n" + "\n".join("  - " + m.replace("\n", "\n    ") for m in self.messages))
            exc.problems = list(self.messages)
            raise exc


# errors of writing itself (a full disk or quota, a file size limit, a failing or read-only device):
# one message naming the file, not a traceback from deep inside a writer
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


def _size(n: float) -> str:
    return f"{n / 1e3:,.1f} kB" if n < 1e6 else f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def check_free_space(path: str | os.PathLike, need_bytes: int, what: str = "") -> None:
    """One error before writing when the filesystem of `path` has less than `need_bytes` free."""
    directory = Path(path).parent
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise EditscaleError(
            f"not enough free space to write {what or path}: it needs {_size(need_bytes)}, {_size(free)} are free on the "
            f"filesystem of {directory}. Free {_size(need_bytes - free)} or more (or put results/ on a larger disk), then "
            f"run snakemake again: finished outputs are kept, nothing was half written")


def write_failed(path: Path, exc: OSError, need_bytes: int | None = None) -> EditscaleError:
    """The one message of a write that failed with an I/O error (WRITE_ERRNOS)."""
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else None
    need = f"; it needs {_size(need_bytes)}" if need_bytes else ""
    return EditscaleError(
        f"could not write {path}: {exc.strerror or exc} (errno {exc.errno}){need}; {_size(free) if free is not None else 'unknown'} "
        f"free on the filesystem of {path.parent}. Nothing was half written: free space (or fix the device), then run "
        f"snakemake again")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None, need_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it onto `path`.

    On any exception the temporary file is removed and `path` is left untouched; an I/O error of
    the write itself (full disk, quota, size limit: WRITE_ERRNOS) becomes one EditscaleError naming
    the file and the free space. `need_bytes`, when the size is known, is checked first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if need_bytes is not None:
        check_free_space(path, need_bytes)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix + ".tmp")
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        if exc.errno in WRITE_ERRNOS:
            raise write_failed(path, exc, need_bytes) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data) -> None:
    """Bytes (a buffer) to `path` atomically, the free space checked first."""
    with atomic_path(path, need_bytes=len(data)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


@contextlib.contextmanager
def atomic_h5(path: str | os.PathLike):
    """An HDF5 file, built in memory and written to `path` atomically when the block ends. The
    HDF5 library never writes to the disk itself: on a full disk it ended the process with a
    segmentation fault (issue 32 item 5); here a full disk is one message from Python's write,
    naming the file and the space it needs, checked before any byte is written."""
    import io as _io

    import h5py

    buf = _io.BytesIO()
    with h5py.File(buf, "w") as f:
        yield f
    write_bytes_atomic(path, buf.getbuffer())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise EditscaleError(f"file not found: {path}")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def array_sha256(*arrays) -> str:
    """sha256 of arrays' dtypes, shapes and bytes (C order): the content hash of a stored matrix,
    recorded when it is written and checked when it is read."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def table_sha256(df) -> str:
    """sha256 of a polars table's content: column names, dtypes and values (CSV text with
    round-trip float formatting), so a changed value changes it and re-encoding does not."""
    h = hashlib.sha256(json.dumps([[c, str(t)] for c, t in df.schema.items()]).encode())
    h.update(df.write_csv().encode())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serializable object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "numpy", "h5py", "polars", "snakemake", "altair"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


DEVICE_ENV = "EDITSCALE_DEVICE"
# the line a command served by `editscale forkserver` starts its stderr with (a job's log): its
# Snakemake benchmark record measures the process that forwarded it (calibration refuses it)
SERVED_MARKER = "editscale: served by the fork server"
JOB_ENV = "EDITSCALE_WORKFLOW_JOB"  # set for workflow jobs: they die with their wrapper (cli.die_with_wrapper)


def signal_on_parent_death(signum: int) -> bool:
    """Linux's PR_SET_PDEATHSIG: `signum` is sent to this process when its parent dies. False when
    the parent died before the request took effect (not Linux: nothing is arranged, True)."""
    if not sys.platform.startswith("linux"):
        return True
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signum)
    return os.getppid() == parent


def job_device() -> str:
    """The device a workflow job runs on: config `resources.device`, handed to every job in the
    environment (workflow.export_job_environment), not as a rule param: how a device is spelled
    ("auto" or the "cpu" it resolves to) is not what a result is computed from, and a param would
    re-plan the whole study (issue 32 item 7). "auto" outside a workflow."""
    return os.environ.get(DEVICE_ENV) or "auto"


def provenance(config_hash: str = "", inputs: dict[str, str] | None = None, device: str = "cpu") -> dict[str, str]:
    """Provenance record stored with every output (HDF5 attrs / parquet metadata).

    `inputs` maps a role (e.g. "model", "stats") to the sha256 of the file it was computed from.
    """
    return {
        "editscale_version": __version__,
        "git_commit": git_commit(),
        "config_hash": config_hash,
        "inputs": json.dumps(inputs or {}, sort_keys=True),
        "packages": json.dumps(package_versions(), sort_keys=True),
        "device": device,
        "python": platform.python_version(),
    }


def write_parquet_atomic(df, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a polars DataFrame to parquet atomically, with string key/value metadata (provenance)
    and the table_sha256 of its values (the audit re-hashes them)."""
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    meta["table_sha256"] = table_sha256(df)
    import io as _io

    buf = _io.BytesIO()  # serialized first: the size is checked against the free space, and the
    df.write_parquet(buf, metadata=meta)  # only writer that touches the disk is Python's (one error)
    write_bytes_atomic(path, buf.getbuffer())


def read_parquet_metadata(path: str | os.PathLike) -> dict[str, str]:
    import polars as pl

    meta = pl.read_parquet_metadata(path)
    meta.pop("ARROW:schema", None)
    return meta


def safe_name(name: str) -> str:
    """A name usable in a file name (figure files per run: overview_{safe_name(run)})."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("_") or "run"
