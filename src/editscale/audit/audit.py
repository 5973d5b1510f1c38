"""`editscale audit RESULTS_DIR`: is every number traceable to its inputs?

Checks, each reported pass/fail with the file it concerns:
  model       every weight file's sha256 equals data/models/{model}/manifest.json (the chain's root)
  stats       every stats file was computed on the model its path names (attrs model_sha256)
  delta-model every delta was computed on that run's base model
  factors     the sha256 of each segment's factors file equals the one its delta recorded
  delta-chain each delta's recorded predecessor sha256 equals the predecessor file on disk
  rederive    sampled checkpoints (always the last) re-derived from base + factors equal the
              stored delta tensors bit for bit (a changed byte in a delta file fails here)
  metrics     every metric table carries provenance (config hash, versions, device) and the
              sha256 of the state files it was computed from still match
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from ..io import EditscaleError, read_parquet_metadata, sha256_file

log = logging.getLogger(__name__)


class Report:
    def __init__(self):
        self.checks: list[dict] = []

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


def audit_models(models_dir: Path, rep: Report) -> dict[str, str]:
    shas = {}
    for manifest_path in sorted(models_dir.glob("*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        name = manifest_path.parent.name
        shas[name] = manifest["model_sha256"]
        for fname, expected in manifest["files"].items():
            path = manifest_path.parent / fname
            ok = path.exists() and sha256_file(path) == expected
            rep.add("model", path, ok, "" if ok else "weight file missing or sha256 differs from manifest.json")
    return shas


def audit_stats(results: Path, model_shas: dict[str, str], rep: Report) -> None:
    for path in sorted((results / "stats").glob("*/*/*.h5")) + sorted((results / "stats").glob("*/*/nullspace/*.h5")):
        model = path.relative_to(results / "stats").parts[0]
        try:
            got = _h5_attrs(path).get("model_sha256")
        except OSError as exc:
            rep.add("stats", path, False, f"unreadable: {exc}")
            continue
        want = model_shas.get(model)
        rep.add("stats", path, got == want, "" if got == want else f"computed on model {got}, but {model} is {want}")


def audit_run(run_dir: Path, models_dir: Path, model_shas: dict[str, str], rep: Report, n_sample: int, rng: random.Random) -> None:
    from ..edit.chain import read_delta, read_run, tensor_sha256
    from ..layout import delta_path, factors_path

    run = read_run(run_dir / "run.json")
    model_sha = model_shas.get(run["model"])
    deltas = sorted((run_dir / "deltas").glob("*.h5"))
    ks = [int(p.stem) for p in deltas]
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
        ok = fpath.exists() and sha256_file(fpath) == attrs.get("factors_sha256")
        rep.add("factors", fpath, ok, "" if ok else "factors file missing or its sha256 differs from the one recorded in its delta")
        prev = attrs.get("prev_delta_sha256")
        k_prev = k - int(run["segment"])
        if k_prev > 0:
            ppath = delta_path(run_dir, k_prev)
            ok = ppath.exists() and sha256_file(ppath) == prev
            rep.add("delta-chain", ppath, ok, "" if ok else f"sha256 differs from the one recorded by {path.name}")
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


def _rederive(run_dir: Path, k: int, segment: int) -> dict:
    """Delta after k edits from factors alone (no stored delta is read)."""
    from ..edit.chain import accumulate, read_factors
    from ..layout import factors_path

    delta: dict = {}
    for end in range(segment, k + 1, segment):
        updates, _, _, _ = read_factors(factors_path(run_dir, end))
        accumulate(delta, [upd for _, upd in updates])
    return delta


def audit_metrics(run_dir: Path, rep: Report) -> None:
    for path in sorted((run_dir / "metrics").glob("*/*.parquet")):
        try:
            meta = read_parquet_metadata(path)
        except Exception as exc:  # polars raises several kinds on a broken file
            rep.add("metrics", path, False, f"unreadable: {exc}")
            continue
        missing = [k for k in ("config_hash", "editscale_version", "packages", "device") if k not in meta]
        if missing:
            rep.add("metrics", path, False, f"provenance keys missing: {missing}")
            continue
        inputs = json.loads(meta.get("inputs", "{}") or "{}")
        ok = True
        for role, rec in inputs.items():
            # Inputs recorded as {"path": ..., "sha256": ...}: the state files a metric was computed on.
            if isinstance(rec, dict) and "path" in rec and "sha256" in rec:
                p = Path(rec["path"])
                if not p.exists() or sha256_file(p) != rec["sha256"]:
                    ok = False
                    rep.add("metric-input", p, False, f"{role} changed since {path} was computed from it")
        if ok:
            rep.add("metrics", path, True)


def audit(results: str | Path, models_dir: str | Path = "data/models", n_sample: int = 2, seed: int = 0) -> dict:
    results, models_dir = Path(results), Path(models_dir)
    if not results.is_dir():
        raise EditscaleError(f"results directory {results} not found")
    rep = Report()
    model_shas = audit_models(models_dir, rep)
    audit_stats(results, model_shas, rep)
    rng = random.Random(seed)
    for run_json in sorted(results.glob("*/run.json")):
        audit_run(run_json.parent, models_dir, model_shas, rep, n_sample, rng)
        audit_metrics(run_json.parent, rep)
    return {"passed": rep.passed, "n_checks": len(rep.checks), "failures": rep.failures(), "checks": rep.checks}
