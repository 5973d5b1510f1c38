"""`editscale audit`: is every number traceable to its inputs?

The audit runs over the files it is given: the audit rule declares every file it checks, so any
change to one re-runs it, and `editscale audit --configfile C` by hand checks the same declared
files of C (a declared file that is missing fails; a run dropped from C is not audited). A passed
audit writes its report to the rule's output; a failed one to `*.failed.json` beside it, removing
the output, so a failed audit never leaves the file that would make the workflow skip its own.
Checks, each reported pass/fail with the file it concerns:
  model       every weight file's sha256 equals data/models/{model}/manifest.json (the chain's root)
  stats       every stats / projection file was computed on the model its path names (attrs
              model_sha256) and its matrices still hash to the content_sha256 recorded at write time
  delta-model every delta was computed on that run's base model
  factors     each segment's factors file holds the content its delta recorded (content_sha256:
              its datasets, not its timing or provenance; files from before content hashes: sha256)
  delta-chain each delta's recorded predecessor content equals the predecessor file on disk
  inputs      every input a delta, factors or metric file recorded (edit sequence, templates,
              previous checkpoint, stats and projections, state files) exists and matches
  rederive    sampled checkpoints (always the last) re-derived from base + factors equal the
              stored delta tensors bit for bit (a changed byte in a delta file fails here)
  metrics     every metric table carries provenance (config hash, versions, device) and its
              values still hash to the table_sha256 it recorded
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from ..io import EditscaleError, read_parquet_metadata, sha256_file

log = logging.getLogger(__name__)


class Hashes:
    """File sha256s and stats / projection content checks, each computed once per audit: many
    outputs record the same inputs (every metric of a checkpoint its delta, every delta the stats)."""

    def __init__(self):
        self._files: dict[str, str] = {}
        self._contents: dict[str, str | EditscaleError] = {}

    def file(self, path: Path) -> str:
        key = str(path)
        if key not in self._files:
            self._files[key] = sha256_file(path)
        return self._files[key]

    def content(self, path: Path) -> str:
        """The verified content hash of a stats / projection file (editscale.stats.mom2.verify_content)
        or of a delta / factors file (editscale.edit.chain.verify_state_content), remembered (its
        error too)."""
        from ..edit.chain import verify_state_content
        from ..stats.mom2 import verify_content

        key = str(path)
        if key not in self._contents:
            try:
                verify = verify_state_content if "state_kind" in _h5_attrs(path) else verify_content
                self._contents[key] = verify(path)
            except EditscaleError as exc:
                self._contents[key] = exc
        found = self._contents[key]
        if isinstance(found, EditscaleError):
            raise found
        return found


class Report:
    def __init__(self):
        self.checks: list[dict] = []
        self.hashes = Hashes()

    def add(self, check: str, file, ok: bool, detail: str = "") -> None:
        self.checks.append({"check": check, "file": str(file), "status": "pass" if ok else "fail", "detail": detail})
        if not ok:
            log.error("audit %s FAILED for %s: %s", check, file, detail)

    @property
    def passed(self) -> bool:
        return all(c["status"] == "pass" for c in self.checks)

    def failures(self) -> list[dict]:
        return [c for c in self.checks if c["status"] == "fail"]


def _h5_attrs(path: Path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        return dict(f.attrs)


def audit_models(manifests: list[Path], rep: Report) -> dict[str, str]:
    shas = {}
    for manifest_path in sorted(manifests):
        manifest = json.loads(manifest_path.read_text())
        name = manifest_path.parent.name
        shas[name] = manifest["model_sha256"]
        for fname, expected in manifest["files"].items():
            path = manifest_path.parent / fname
            ok = path.exists() and sha256_file(path) == expected
            rep.add("model", path, ok, "" if ok else "weight file missing or sha256 differs from manifest.json")
    return shas


def _stats_model(path: Path) -> str:
    """The model a stats file belongs to: results/stats/{model}/{corpus}/[nullspace/]{module}.h5."""
    parts = path.parts
    return parts[parts.index("stats") + 1] if "stats" in parts[:-1] else ""


def audit_stats(paths: list[Path], model_shas: dict[str, str], rep: Report) -> None:
    for path in sorted(paths):
        model = _stats_model(path)
        try:
            got = _h5_attrs(path).get("model_sha256")
            rep.hashes.content(path)
        except (OSError, EditscaleError) as exc:
            rep.add("stats", path, False, str(exc))
            continue
        want = model_shas.get(model)
        rep.add("stats", path, got == want, "" if got == want else f"computed on model {got}, but {model} is {want}")


def audit_inputs(owner: Path, inputs: dict, rep: Report) -> bool:
    """Every input `owner` recorded as {"path", "sha256"} (a file's hash) or {"path",
    "content_sha256"} (a stats / projection file's recorded content hash) exists and matches."""
    ok = True
    for role, rec in sorted(inputs.items()):
        if not (isinstance(rec, dict) and "path" in rec):
            continue
        p = Path(rec["path"])
        if not p.exists():
            why = f"{role} {p} is missing (recorded by {owner})"
        elif "sha256" in rec and rep.hashes.file(p) != rec["sha256"]:
            why = f"{role} {p} changed since {owner} was computed from it"
        elif "content_sha256" in rec:
            try:
                why = "" if rep.hashes.content(p) == rec["content_sha256"] else f"{role} {p} is not the file {owner} was computed from"
            except EditscaleError as exc:
                why = str(exc)
        else:
            why = ""
        if why:
            ok = False
            rep.add("inputs", p, False, why)
    return ok


def audit_run(run_dir: Path, ks: list[int], model_shas: dict[str, str], rep: Report, n_sample: int, rng: random.Random) -> None:
    """The chain of one run over its checkpoints `ks` (the segment ends the audit was given)."""
    import numpy as np

    from ..edit.chain import read_delta, read_memory, read_run, tensor_sha256
    from ..layout import delta_path, factors_path

    run = read_run(run_dir / "run.json")
    model_sha = model_shas.get(run["model"])
    for k in ks:
        path = delta_path(run_dir, k)
        try:
            attrs = _h5_attrs(path)
        except OSError as exc:
            rep.add("delta-model", path, False, f"unreadable: {exc}")
            continue
        rep.add("delta-model", path, attrs.get("model_sha256") == model_sha,
                f"delta computed on {attrs.get('model_sha256')}, run's model is {model_sha}")
        fpath = factors_path(run_dir, k)
        ok, why = _recorded_state_matches(rep, fpath, attrs, "factors")
        rep.add("factors", fpath, ok, "" if ok else why or "factors file missing or its content differs from the one recorded in its delta")
        k_prev = k - int(run["segment"])
        if k_prev > 0:
            ppath = delta_path(run_dir, k_prev)
            ok, why = _recorded_state_matches(rep, ppath, attrs, "prev_delta")
            rep.add("delta-chain", ppath, ok, "" if ok else why or f"its content differs from the one recorded by {path.name}")
        if audit_inputs(path, json.loads(attrs.get("inputs", "{}") or "{}"), rep):
            rep.add("inputs", path, True)
    # Re-derive sampled checkpoints from base + all factors (replayed segment by segment from zero).
    if not ks:
        return
    sample = sorted(set(rng.sample(ks, min(n_sample, len(ks))) + [ks[-1]]))
    for k in sample:
        path = delta_path(run_dir, k)
        try:
            stored, _ = read_delta(path)
            derived = _rederive(run_dir, k, int(run["segment"]))
        except (OSError, KeyError, EditscaleError) as exc:
            rep.add("rederive", path, False, f"could not re-derive: {exc}")
            continue
        diff = [m for m in stored if m not in derived or tensor_sha256(stored[m]) != tensor_sha256(derived[m])]
        rep.add("rederive", path, not diff, "" if not diff else f"stored tensors differ from base + factors for {diff}")
        # a method's memory (editscale.edit.memory): its stored tables equal the ops of every segment replayed from empty
        stored_memory = read_memory(path)
        if stored_memory:
            replayed = _rederive_memory(run_dir, k, int(run["segment"]), stored_memory)
            diff = [key for key in stored_memory if key not in replayed or not np.array_equal(stored_memory[key], replayed[key])]
            rep.add("rederive-memory", path, not diff, "" if not diff else f"stored memory differs from the replayed memory ops for {diff}")


def _recorded_state_matches(rep: Report, path: Path, attrs: dict, role: str) -> tuple[bool, str]:
    """Does the state file `path` hold what a delta recorded of it (attrs `{role}_content_sha256`;
    a delta from before content hashes: `{role}_sha256`, the file's bytes)? (ok, why not)"""
    if not path.exists():
        return False, f"{path} is missing"
    if f"{role}_content_sha256" not in attrs:
        return rep.hashes.file(path) == attrs.get(f"{role}_sha256"), ""
    try:
        return rep.hashes.content(path) == attrs[f"{role}_content_sha256"], ""
    except EditscaleError as exc:
        return False, str(exc)


def _rederive_memory(run_dir: Path, k: int, segment: int, like: dict) -> dict:
    """The memory after k edits from the factors files' memory ops alone, in the tables' shapes
    and dtypes of `like` (a stored memory)."""
    from ..edit.chain import read_memory_ops
    from ..edit.memory import tables_from_ops
    from ..layout import factors_path

    return tables_from_ops((op for end in range(segment, k + 1, segment) for _, op in read_memory_ops(factors_path(run_dir, end))), like)


def _rederive(run_dir: Path, k: int, segment: int) -> dict:
    """Delta after k edits from factors alone (no stored delta is read)."""
    from ..edit.chain import accumulate, read_factors
    from ..layout import factors_path

    delta: dict = {}
    for end in range(segment, k + 1, segment):
        updates, _, _, _ = read_factors(factors_path(run_dir, end))
        accumulate(delta, [upd for _, upd in updates])
    return delta


def audit_metrics(paths: list[Path], rep: Report) -> None:
    import polars as pl

    from ..io import table_sha256

    for path in sorted(paths):
        try:
            meta = read_parquet_metadata(path)
            table = pl.read_parquet(path)
        except Exception as exc:  # noqa: BLE001 - polars raises several kinds on a broken file
            rep.add("metrics", path, False, f"unreadable: {exc}")
            continue
        missing = [k for k in ("config_hash", "editscale_version", "packages", "device", "table_sha256") if k not in meta]
        if missing:
            rep.add("metrics", path, False, f"provenance keys missing: {missing}")
            continue
        if table_sha256(table) != meta["table_sha256"]:
            rep.add("metrics", path, False, "its values no longer hash to the table_sha256 recorded when it was written")
            continue
        if audit_inputs(path, json.loads(meta.get("inputs", "{}") or "{}"), rep):
            rep.add("metrics", path, True)


def classify(files: list[Path]) -> dict:
    """The files of an audit by kind, from their layout names (editscale.layout)."""
    out: dict = {"manifests": [], "stats": [], "runs": {}, "metrics": [], "other": []}
    for p in files:
        if p.name == "manifest.json":
            out["manifests"].append(p)
        elif p.suffix == ".h5" and _stats_model(p) and p.parent.name not in ("deltas", "factors"):
            out["stats"].append(p)
        elif p.suffix == ".h5" and p.parent.name == "deltas":
            out["runs"].setdefault(p.parent.parent, []).append(int(p.stem))
        elif p.suffix == ".parquet" and p.parent.parent.name == "metrics":
            out["metrics"].append(p)
        elif p.name == "run.json":
            out["runs"].setdefault(p.parent, [])
        else:
            out["other"].append(p)
    return out


def failed_report_path(out: str | Path) -> Path:
    """Where a failed audit's report goes: beside the rule's output, never at it."""
    out = Path(out)
    return out.with_name(out.stem + ".failed" + out.suffix)


def write_report(result: dict, out: str | Path) -> Path:
    """Write the audit's report: to `out` when it passed (a stale failed report is removed), else to
    failed_report_path(out) with `out` removed, so that Snakemake re-runs the audit rule."""
    from ..io import write_json_atomic

    out, failed = Path(out), failed_report_path(out)
    target, stale = (out, failed) if result["passed"] else (failed, out)
    stale.unlink(missing_ok=True)
    write_json_atomic(target, result)
    return target


def audit(files, n_sample: int = 2, seed: int = 0) -> dict:
    """Audit the given files (module docstring); the result records when it ran and over which files."""
    import datetime

    files = [Path(f) for f in files]
    missing = [str(p) for p in files if not p.exists()]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rep = Report()
    for p in missing:
        rep.add("exists", p, False, "file to audit is missing")
    kinds = classify([p for p in files if p.exists()])
    model_shas = audit_models(kinds["manifests"], rep)
    audit_stats(kinds["stats"], model_shas, rep)
    rng = random.Random(seed)
    for run_dir, ks in sorted(kinds["runs"].items()):
        audit_run(run_dir, sorted(ks), model_shas, rep, n_sample, rng)
    audit_metrics(kinds["metrics"], rep)
    return {
        "passed": rep.passed, "n_checks": len(rep.checks), "failures": rep.failures(), "checks": rep.checks,
        "started": started, "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": [str(p) for p in files],
    }
