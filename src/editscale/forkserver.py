"""A warm interpreter for many short `editscale` commands: `editscale forkserver --socket PATH`
imports torch, transformers and editscale's commands once (warm_imports), and each `editscale ...` command
run with EDITSCALE_FORKSERVER=PATH in its environment is carried out by a fork of that process.

Why: a job on a tiny model spends most of its CPU importing torch and transformers (an evaluate
job of the tiny methods workflow: 5.0 of its 5.9 CPU-seconds on the 2-core AMD VM), and a test
suite or a study of tiny models runs hundreds of such jobs. On a real model the import is noise
beside the model's own work: there is nothing to gain, so nothing uses the server unless asked.

A served command keeps what makes it the command it was: its argv, working directory,
environment, umask, stdin / stdout / stderr (handed over as file descriptors), its exit status
or the signal that ended it (the `editscale` process it was typed as ends the same way), and its
signals (SIGINT, SIGTERM and SIGHUP sent to that process are forwarded). If that process dies
without a word (kill -9), the served command gets SIGTERM, as cli.die_with_wrapper arranges for
a job whose shell died; SIGTERM raises SystemExit there, so atomic writes remove their
temporaries.

What a fork cannot give a command is refused, and the command then runs in its own process as
it would have without the server, saying so in one line on stderr: another Python interpreter,
editscale's source changed since the server started, or an environment that differs in a
variable read when a library is imported (SENSITIVE_PREFIXES; the thread counts Snakemake sets
for each job, OMP_NUM_THREADS, MKL_NUM_THREADS and OPENBLAS_NUM_THREADS, and PYTHONUNBUFFERED /
PYTHONDONTWRITEBYTECODE are applied in the command's process instead, where the server started
without them). SLURM_* is among them: a served job would run outside its cluster job's cgroup.
The server's log (its stderr) has one line per command: directory, argv, how it ended.

Use: `editscale forkserver --socket /tmp/es.sock &`, then `EDITSCALE_FORKSERVER=/tmp/es.sock
snakemake --cores all ...` (a local study of a tiny model); the tests start one per test process
(tests/conftest.py). Snakemake's benchmark records of a served job measure
the small `editscale` process that forwarded it, not the job: a study whose memory `editscale
doctor` should calibrate from must run without the server.
"""

from __future__ import annotations

import array
import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import NoReturn

from .io import JOB_ENV, SERVED_MARKER, EditscaleError, signal_on_parent_death

FORKSERVER_ENV = "EDITSCALE_FORKSERVER"
# variables that some library reads once, when it is imported (or the interpreter when it starts)
SENSITIVE_PREFIXES = ("PYTHON", "LD_", "HF_", "HUGGINGFACE", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA", "NVIDIA_", "ROCM",
                      "HIP_", "MKL_", "KMP_", "OPENBLAS_", "OMP_", "POLARS_", "SLURM_")
# of those, the ones a served command's process applies itself (_become_command): the streams'
# buffering, bytecode writing, and the thread counts of torch (OpenMP, MKL) and OpenBLAS, which
# Snakemake sets to each job's threads (the counts only where the server started without them)
APPLIED = ("PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")
THREAD_COUNTS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_HEADER = struct.Struct("!I")


# ---------------------------------------------------------------------------------------------
# the client: `editscale ...` with EDITSCALE_FORKSERVER set


def run_served(path: str, argv: list[str]) -> int | None:
    """Have the server at `path` run `editscale argv`; its exit status, or None when it cannot
    (unreachable, or it refused: the reason is on stderr) and the caller runs argv itself."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as exc:
        _say(f"fork server {path} unreachable ({exc.strerror or exc}); running in this process")
        return None
    umask = os.umask(0)
    os.umask(umask)
    request = json.dumps({"argv": ["editscale", *argv], "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask,
                          "python": sys.executable}).encode()
    fds = [fd if _is_open(fd) else os.open(os.devnull, os.O_RDWR) for fd in (0, 1, 2)]
    sock.sendmsg([_HEADER.pack(len(request))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    sock.sendall(request)
    reply = _read_message(sock)
    if reply is None or "refused" in reply:
        _say(f"fork server {path} refused: {reply['refused'] if reply else 'it closed the connection'}; running in this process")
        return None

    def forward(signum, frame):
        try:
            sock.send(bytes([signum]))
        except OSError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    if os.environ.get(JOB_ENV):
        signal_on_parent_death(signal.SIGTERM)  # forwarded: the served job dies with this job's shell
    status = _read_message(sock)
    if status is None:
        _say(f"fork server {path} ended without the command's status")
        return 1
    if "signal" in status:
        signal.signal(status["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), status["signal"])
        return 128 + status["signal"]
    return int(status["exit"])


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _say(message: str) -> None:
    print(f"editscale: {message}", file=sys.stderr, flush=True)


def _send_message(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_message(sock: socket.socket) -> dict | None:
    header = _read_exactly(sock, _HEADER.size)
    if header is None:
        return None
    body = _read_exactly(sock, _HEADER.unpack(header)[0])
    return None if body is None else json.loads(body)


# ---------------------------------------------------------------------------------------------
# the server


def warm_imports(build_parser) -> list[str]:
    """Import what the commands import: torch, transformers' model loading and the model classes
    of every registered architecture, the data libraries, the command line and the modules a job
    loads a model with, and every registry's built-in entries (what a command's first read of a
    registry loads). Not the plugin modules (editscale.evaluate.harness, ...): importing one
    registers its entries, which a command's own process has only when its config lists it.
    Returns what could not be imported (a model type this transformers lacks), by name."""
    import importlib

    import h5py  # noqa: F401
    import numpy  # noqa: F401
    import polars  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import tqdm  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    from .edit import chain  # noqa: F401
    from .evaluate import job  # noqa: F401
    from .models import load  # noqa: F401
    from .models.registry import ARCHITECTURES
    from .registry import REGISTRIES

    build_parser()  # every stage's command line (cli's, handed down: this module sits below cli)
    for registry in list(REGISTRIES.values()):
        len(registry)  # its built-in entries and installed entry points, as a command's first read loads them
    failed = []
    for model_type in ARCHITECTURES:
        name = model_type_to_module_name(model_type)
        try:
            importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except ImportError:
            failed.append(f"transformers.models.{name}")
    return failed


def source_stamp() -> tuple[int, int]:
    """(count, newest modification time) of editscale's .py files: a changed source re-plans the
    server's answers (refused), since the server holds the modules as they were imported."""
    import editscale

    times = [p.stat().st_mtime_ns for root in editscale.__path__ for p in Path(root).rglob("*.py")]
    return len(times), max(times, default=0)


def openblas_thread_setters() -> list | None:
    """openblas_set_num_threads of every OpenBLAS library loaded (numpy's, scipy's), or None when
    one has none that can be found (then OPENBLAS_NUM_THREADS must match the server's)."""
    import ctypes

    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and line.split()[-1].startswith("/")})
    setters = []
    for path in paths:
        lib = ctypes.CDLL(path)
        names = ("openblas_set_num_threads", "openblas_set_num_threads64_", "scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads")
        found = [getattr(lib, name) for name in names if hasattr(lib, name)]
        if not found:
            return None
        setters.append(found[0])
    return setters


class ServerState:
    """What the server compares a request with (refusal) and hands its command's process."""

    def __init__(self, path: str, env_before: dict):
        self.path = path
        self.env_before = env_before
        # what the imports put in the environment (TORCHINDUCTOR_CACHE_DIR, ...): a command's own
        # process has it too, from the same imports
        self.set_by_imports = {k: v for k, v in os.environ.items() if k not in env_before}
        self.stamp = source_stamp()
        self.blas_setters = openblas_thread_setters()
        applied = [k for k in THREAD_COUNTS if k not in env_before]
        if self.blas_setters is None and "OPENBLAS_NUM_THREADS" in applied:
            applied.remove("OPENBLAS_NUM_THREADS")
        self.applied = set(APPLIED) | set(applied)

    def command_env(self, env: dict) -> dict:
        return {**self.set_by_imports, **env}

    def sensitive(self, env: dict) -> dict:
        return {k: v for k, v in env.items() if k.startswith(SENSITIVE_PREFIXES) and k not in self.applied}

    def refusal(self, request: dict) -> str:
        """Why the server cannot run `request` as its own process would ("" when it can)."""
        if os.path.realpath(request["python"]) != os.path.realpath(sys.executable):
            return f"another Python ({request['python']}; the server runs {sys.executable})"
        if source_stamp() != self.stamp:
            return "editscale's source changed since the server started"
        mine, theirs = self.sensitive(self.command_env(self.env_before)), self.sensitive(self.command_env(request["env"]))
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            return f"the environment differs from the server's in {', '.join(differ)}, read when libraries are imported"
        return ""

    def apply_thread_counts(self) -> None:
        """In the command's process: the thread counts of its environment, as the libraries would
        have read them at import (OpenBLAS: OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS)."""
        def count(*keys):
            for key in keys:
                value = os.environ.get(key, "")
                if value.isdigit() and int(value) > 0:
                    return int(value)
            return None

        torch_threads = count(*(k for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in self.applied))
        if torch_threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(torch_threads)
        blas_threads = count("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if "OPENBLAS_NUM_THREADS" in self.applied else None
        for setter in (self.blas_setters or []) if blas_threads else []:
            setter(blas_threads)


def serve(path: str, build_parser) -> None:
    """Listen on `path` until SIGTERM or SIGINT; each connection is one command (module doc).
    `build_parser`: cli's, imported with every stage's command line before the first fork."""
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # a server that was killed leaves its socket file
        else:
            probe.close()
            raise EditscaleError(f"--socket {path}: a fork server is listening there already")
    env_before = dict(os.environ)
    failed = warm_imports(build_parser)
    state, server_pid = ServerState(path, env_before), os.getpid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # each connection's handler is reaped by the kernel
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    _say(f"fork server listening on {path} (pid {server_pid}; {len(sys.modules)} modules imported"
         + (f"; not imported: {', '.join(failed)}" if failed else "") + ")")
    try:
        while True:
            try:
                conn, _ = sock.accept()
            except InterruptedError:
                continue
            if os.fork() == 0:
                sock.close()
                _handle(conn, state)  # leaves only by ServedCommand, in the command's process
            conn.close()
    except KeyboardInterrupt:
        pass
    finally:
        if os.getpid() == server_pid:
            sock.close()
            if os.path.exists(path):
                os.unlink(path)


def _handle(conn: socket.socket, state: ServerState) -> None:
    """One connection, in a fork of the server: fork the command's process and report how it
    ended. The command's process leaves by ServedCommand (_become_command); this one by os._exit."""
    import threading

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        data, fds = _receive_request(conn)
        reason = state.refusal(data)
    except Exception as exc:  # a malformed request: this handler alone ends
        data, fds, reason = None, [], f"unreadable request ({exc})"
    if reason:
        _log(f"refused {_described(data)}: {reason}")
        _send_message(conn, {"refused": reason})
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become_command({**data, "env": state.command_env(data["env"])}, fds, state)
    for fd in fds:
        os.close(fd)
    _send_message(conn, {"pid": pid})
    done = threading.Event()

    def forward():
        while True:
            try:
                got = conn.recv(64)
            except OSError:
                got = b""
            if done.is_set():
                return
            for signum in got or bytes([signal.SIGTERM]):  # the client is gone: as if its shell died
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    return
            if not got:
                return

    threading.Thread(target=forward, daemon=True).start()
    _, status = os.waitpid(pid, 0)
    done.set()
    code = os.waitstatus_to_exitcode(status)
    _log(f"pid {pid} {_described(data)} -> " + (f"signal {-code}" if code < 0 else f"exit {code}"))
    try:
        _send_message(conn, {"signal": -code} if code < 0 else {"exit": code})
    except OSError:
        pass
    os._exit(0)


def _log(line: str) -> None:
    """A line of the server's log (its stderr, which each connection's handler keeps)."""
    import time

    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", file=sys.stderr, flush=True)


def _described(data: dict | None) -> str:
    import shlex

    return f"cd {data['cwd']}: {shlex.join(data['argv'])}" if isinstance(data, dict) and "argv" in data else "(unreadable request)"


def _receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    msg, ancdata, _, _ = conn.recvmsg(_HEADER.size, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if len(msg) < _HEADER.size:
        msg += _read_exactly(conn, _HEADER.size - len(msg)) or b""
    body = _read_exactly(conn, _HEADER.unpack(msg)[0])
    if body is None or len(fds) != 3:
        raise ValueError("no request, or not three file descriptors")
    return json.loads(body), list(fds)


def _become_command(data: dict, fds: list[int], state: ServerState) -> None:
    """This process takes over the command's descriptors, directory, environment, umask, argv,
    default signal handling and logging, then leaves the server's stack by ServedCommand."""
    import logging

    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    os.chdir(data["cwd"])
    os.umask(data["umask"])
    os.environ.clear()
    os.environ.update(data["env"])
    sys.argv = list(data["argv"])
    for handler in list(logging.root.handlers):  # the server's (cli.run): the command configures its own
        logging.root.removeHandler(handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    for stream in (sys.stdout, sys.stderr):
        try:  # as the interpreter sets them up at start
            stream.reconfigure(line_buffering=stream.isatty() or stream is sys.stderr, write_through=unbuffered)
        except (AttributeError, ValueError, OSError):
            pass
    sys.dont_write_bytecode = bool(os.environ.get("PYTHONDONTWRITEBYTECODE"))
    state.apply_thread_counts()
    _fresh_random_state()
    # first on its stderr, before anything the command writes
    print(f"{SERVED_MARKER} at {state.path} (pid {os.getpid()}): a benchmark record of this job measures the process that forwarded it",
          file=sys.stderr, flush=True)
    raise ServedCommand(sys.argv[1:])


def _fresh_random_state() -> None:
    """The random generators as a new process has them, not as the server left them to every
    fork: each seeded anew from the OS (torch too seeds its CPU generator so at start)."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].random.default_generator.seed()


class ServedCommand(BaseException):
    """Raised in a command's process to leave the server's stack: cli.main catches it and runs the
    command at the top (run_to_exit)."""

    def __init__(self, argv: list[str]):
        super().__init__(argv)
        self.argv = argv


def run_to_exit(command) -> NoReturn:
    """Run `command()` (-> exit status) in a served command's process and end the process as the
    interpreter ends one: the status of SystemExit, a traceback and 1 for an exception, death by
    SIGINT for an uncaught KeyboardInterrupt; then what Py_FinalizeEx does before it tears the
    modules down: non-daemon threads joined, atexit functions, the standard streams flushed. The
    teardown of the server's 3,000 modules is left out: a second of CPU that changes nothing."""
    import atexit
    import threading
    import traceback

    try:
        code = command()
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        traceback.print_exc()
        _finish()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    getattr(threading, "_shutdown", lambda: None)()
    atexit._run_exitfuncs()
    _finish()
    os._exit(code & 0xFF)


def _finish() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def register(sub, build_parser) -> None:
    p = sub.add_parser("forkserver", help="serve `editscale` commands from a warm interpreter (tests, studies of tiny models)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", required=True, help=f"the Unix socket to listen on; commands find it in ${FORKSERVER_ENV}")
    p.set_defaults(func=lambda args: serve(args.socket, build_parser))
