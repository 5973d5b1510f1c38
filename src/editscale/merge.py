"""Studies that outlive a sitting: a finished run's small mergeable record, and one study's
tables, figures and audit built from records made in several results directories (several
sittings, machines or cluster nodes).

    editscale export-run --configfile C --run R [--results-root .] --out records/
        records/R/record.json                what must be shared and what the run was made from
        records/R/metrics/{metric}/{k}.parquet   the run's metric files, byte for byte
        records/R/edit_log.parquet           the per-edit log its factors files hold
    editscale export-run ... --pack          the same record as one file, records/R.record.tar.xz
                                             (deterministic: one run's bytes do not change on re-export;
                                             ~40 % of the directory's bytes: what docs/results commits)
    editscale merge --configfile C --out DIR records/ other-results/records/ ...
        DIR/tables/*.parquet, *.csv          the report tables (editscale.report.tables), as the
                                             workflow's report_tables rule builds them
        DIR/plots/                           the figures (editscale.report.plots)
        DIR/merge.json                       which record each run came from, every file's sha256
        DIR/audit.json                       every record file re-hashed against its record

`merge` takes records in either form: a packed one is unpacked into OUT/records/R/ and named by
its archive in merge.json and the published provenance (a file inside it as R.record.tar.xz/metrics/...).

A record holds no deltas or factors (megabytes per checkpoint): what the report reads of them is
the edit log and the bytes they take, both in the record. The files a record copies are the ones
the config declares for the run (editscale.workflow), read from `--results-root`, never a glob.

Merging checks that the records share what must be shared, and refuses with one error naming every
difference: each run's record was made with this config's run (its run.json: method, resolved
hparams, dtype, dataset, sample, seed) and metric settings; runs of one model share the model's
sha256, runs of one dataset its sha256, runs reading one statistics file its sha256, runs whose
metrics read one data file (the perplexity corpus's tokens, a downstream task's file; from the
metric files' provenance, `data_identity`) its sha256, and every record has the same editscale
version. Statistics and a self-sampled corpus are float32 computations whose rounding differs
between CPU kinds (benchmarks/RESULTS.md 13): runs made on two machines merge only where they read
none, or carry one machine's statistics, unless `--statistics-per-machine` says that each machine's
runs read their own: the statistics (`precomputed:` keys) must then agree among the runs of one
machine (its fingerprint: CPU, cores, device, torch), everything else still across all, and
merge.json, the published provenance and results.md name each machine's runs and statistics
hashes. A run of the config with no record, or whose record lacks
files of the config, is an error unless `--allow-missing` (then the tables hold the runs that are
there, and merge.json names the missing ones).

A chain stopped where its budget ended is exported as such: `export-run --until K --reason TEXT`
records the run as if its n_edits were K (K a segment end; every file due up to K present) with
the reason. Merging takes such a record at its K, says so in merge.json and the published
provenance (`stopped`: reached, planned, reason), and the tables hold the run to edit K.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from . import layout
from .io import EditscaleError, sha256_file, sha256_json, write_json_atomic, write_parquet_atomic
from .workflow import canonical_json

log = logging.getLogger(__name__)

RECORD_FORMAT = 1
PRECOMPUTED = "precomputed:"  # shared keys of statistics / projection files (shared_identity)
RECORD_FILE = "record.json"
EDIT_LOG_FILE = "edit_log.parquet"


def run_inputs(config: dict, run: dict, root: Path) -> dict[str, Any]:
    """The files a run's record is made from (the config's declared paths under `root`)."""
    from . import workflow as wf

    metrics = {m: [root / f for f in wf.metric_files(config, run, m)] for m in wf.metrics_registry()}
    return {
        "metrics": metrics,
        "factors": [root / wf.factors_file(run["name"], k) for k in wf.segment_ends(run)],
        "deltas": [root / wf.delta_file(run["name"], k) for k in wf.segment_ends(run)],
        "run_json": root / layout.run_dir(run["name"]) / "run.json",
        "edits": root / layout.run_dir(run["name"]) / "edits.jsonl",
        "model_manifest": root / "data" / "models" / run["model"] / "manifest.json",
        "dataset": root / "data" / "datasets" / f"{run['dataset']}.jsonl",
        "stats": {m: root / p for files in wf.precomputed_files(config, run).values() for m, p in files.items()},
    }


def made_by(paths: list[Path]) -> dict[str, list[str]]:
    """The editscale versions and commits that wrote the given metric files (their provenance):
    the code that made the run, not the code exporting it."""
    from .io import read_parquet_metadata

    versions, commits = set(), set()
    for p in paths:
        meta = read_parquet_metadata(p)
        versions.add(meta.get("editscale_version", "unknown"))
        commits.add(meta.get("git_commit", "unknown"))
    return {"editscale_version": sorted(versions), "git_commit": sorted(commits)}


def content_identity(path: Path) -> str:
    """sha256 of what a file holds: a statistics or projection file's recorded `content_sha256`
    (its tensors; the file's bytes also hold when and where it was made), else the file's bytes."""
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path, "r") as f:
            if "content_sha256" in f.attrs:
                return str(f.attrs["content_sha256"])
    return sha256_file(path)


def shared_identity(run: dict, files: dict[str, Any], versions: list[str]) -> dict[str, Any]:
    """What runs made elsewhere must agree on, keyed by what they share (merge checks it): the
    model's weights (the manifest's model_sha256, not the manifest, which records its making),
    the dataset, each statistics / projection file's content, the editscale version(s) that made
    the run (`made_by`)."""
    from .models.load import model_sha

    return {
        "editscale_version": ", ".join(versions),
        f"model:{run['model']}": model_sha(files["model_manifest"].parent),
        f"dataset:{run['dataset']}": sha256_file(files["dataset"]),
        **{f"{PRECOMPUTED}{Path(p).relative_to(files['model_manifest'].parents[3])}": content_identity(Path(p))
           for p in files["stats"].values()},
    }


def data_identity(record_dir: Path, metric_files: list[Path]) -> dict[str, str]:
    """`data:{role}` -> sha256 of each data file the run's metrics read (`EvaluationJob.uses`: the
    perplexity corpus's tokens, downstream tasks' files), from the metric files' provenance
    (`inputs`; a string there is a shared file's hash, a {path, ...} the run's own file). Read at
    merge, so records exported before it was checked are checked too: a corpus sampled on another
    CPU (editscale.data.corpus: float32 rounding) differs, and its perplexities are not comparable."""
    from .io import read_parquet_metadata

    seen: dict[str, tuple[str, Path]] = {}
    for rel in metric_files:
        try:
            inputs = json.loads(read_parquet_metadata(record_dir / rel).get("inputs", "{}"))
        except Exception:  # noqa: BLE001 - a file changed since export: merge's audit names it
            continue
        for role, value in inputs.items():
            if role == "model" or not isinstance(value, str):
                continue  # the model is checked as model:{name}; a dict is the run's own file
            if role in seen and seen[role][0] != value:
                raise EditscaleError(f"merge: the record in {record_dir} read two different {role} files: {seen[role][1]} has "
                                     f"{seen[role][0][:16]}, {rel} {value[:16]} (its metrics were made from different data)")
            seen.setdefault(role, (value, rel))
    return {f"data:{role}": value for role, (value, _) in sorted(seen.items())}


def job_seconds(config: dict, run: dict, root: Path) -> dict[str, float]:
    """Wall seconds of the run's jobs from their Snakemake benchmark records: edit chain,
    evaluation, and their sum (a record missing: left out, counted in `jobs_missing`)."""
    from .calibration import record_seconds
    from .planning import run_jobs

    out = {"edit_s": 0.0, "eval_s": 0.0, "other_s": 0.0, "jobs": 0, "jobs_missing": 0}
    for job in run_jobs(config, run, root):
        s = record_seconds(root / job.record)
        if s is None:
            out["jobs_missing"] += 1
            continue
        out["jobs"] += 1
        key = "edit_s" if job.kind.startswith("edit:") else "eval_s" if job.kind.startswith("metric:") else "other_s"
        out[key] += s
    out["total_s"] = out["edit_s"] + out["eval_s"] + out["other_s"]
    return out


def export_run(config: dict, run_name: str, out: str | Path, root: str | Path = ".", until: int | None = None,
               reason: str | None = None, pack: bool = False) -> Path:
    """Write the run's record to out/{run}/, or with `pack` to out/{run}.record.tar.xz (module doc);
    refuses an unfinished run, naming the first missing file. `until`: the run stopped at that many
    edits, for `reason` (module doc)."""
    from .doctor import machine_fingerprint, machine_info
    from .io import git_commit
    from .report.tables import edit_log_from_factors, normalize_edit_log

    from .workflow import run_by_name, stopped_run

    root = Path(root)
    run = run_by_name(config, run_name)
    stopped = None
    if until is not None:
        if not reason:
            raise EditscaleError(f"export-run --until {until}: say why the run {run_name} stops there (--reason)")
        stopped = {"reached": until, "planned": run["n_edits"], "reason": reason}
        run = stopped_run(config, run, until)
    files = run_inputs(config, run, root)
    needed = [p for ps in files["metrics"].values() for p in ps] + files["factors"] + files["deltas"] + [
        files["run_json"], files["edits"], files["model_manifest"], files["dataset"], *files["stats"].values()]
    missing = [p for p in needed if not Path(p).is_file()]
    if missing and until is not None:
        raise EditscaleError(f"export-run --until {until}: run {run_name} lacks {len(missing)} file(s) due up to edit {until} in {root}, "
                             f"e.g. {missing[0]}: run its jobs up to there first, `snakemake $(editscale targets --configfile "
                             f"<config> --run {run_name} --until {until})`")
    if missing:
        raise EditscaleError(f"run {run_name} is not finished in {root}: {len(missing)} of its files are missing, e.g. {missing[0]} "
                             "(continue it with snakemake, then export)")
    dest = Path(out) / run_name
    tmp = dest.with_name(dest.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    copied: dict[str, str] = {}
    for metric, paths in files["metrics"].items():
        for p in paths:
            rel = Path("metrics") / metric / p.name
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, tmp / rel)
            copied[str(rel)] = sha256_file(p)
    log_df = normalize_edit_log(edit_log_from_factors(files["factors"], [run_name]))
    write_parquet_atomic(log_df, tmp / EDIT_LOG_FILE, {})
    copied[EDIT_LOG_FILE] = sha256_file(tmp / EDIT_LOG_FILE)
    from . import workflow as wf

    provenance = made_by([p for ps in files["metrics"].values() for p in ps])
    record = {
        "format": RECORD_FORMAT,
        "run": run_name,
        "meta": json.loads(wf.runs_meta({"runs": [run]}))[0],
        "run_record": json.loads(files["run_json"].read_text(encoding="utf-8")),
        "metric_config": {m: json.loads(wf.metric_params_json(config, m)) for m in wf.metrics_registry()},
        "shared": shared_identity(run, files, provenance["editscale_version"]),
        "edits_sha256": sha256_file(files["edits"]),
        "storage_bytes": sum(Path(p).stat().st_size for p in files["factors"] + files["deltas"]),
        "git_commit": provenance["git_commit"],
        "exported_by": git_commit(),
        "machine": machine_fingerprint(machine_info(root)),
        "job_seconds": job_seconds(config, run, root),
        "n_edits": run["n_edits"],
        "stopped": stopped,
        "files": copied,
    }
    write_json_atomic(tmp / RECORD_FILE, record)
    if pack:
        packed = pack_record(tmp, Path(out) / (run_name + layout.RECORD_SUFFIX), run_name)
        shutil.rmtree(tmp)
        log.info("record of run %s: %d files -> %s", run_name, len(copied) + 1, packed)
        return packed
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    log.info("record of run %s: %d files -> %s", run_name, len(copied) + 1, dest)
    return dest


def pack_record(record_dir: str | Path, dest: str | Path, run: str | None = None) -> Path:
    """The record directory as one xz-compressed tar at `dest`, its members under {run}/ (default:
    the directory's name), in sorted order with times, owners and modes fixed: the same record
    always packs to the same bytes."""
    import io
    import lzma
    import tarfile

    from .io import atomic_path

    record_dir, dest = Path(record_dir), Path(dest)
    run = run or record_dir.name
    if not (record_dir / RECORD_FILE).is_file():
        raise EditscaleError(f"pack: {record_dir} holds no run record ({RECORD_FILE})")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in record_dir.rglob("*") if p.is_file()):
            info = tarfile.TarInfo(f"{run}/{path.relative_to(record_dir).as_posix()}")
            data = path.read_bytes()
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    with atomic_path(dest) as tmp:
        Path(tmp).write_bytes(lzma.compress(buf.getvalue(), preset=9))
    return dest


def unpack_record(archive: str | Path, into: str | Path) -> Path:
    """A packed record's directory, unpacked to into/{run}/ (replacing one there); refuses an
    archive that is not one record (members outside {run}/, links, no record.json)."""
    import tarfile

    archive, into = Path(archive), Path(into)
    try:
        with tarfile.open(archive, mode="r:xz") as tar:
            members = tar.getmembers()
            runs = {m.name.split("/", 1)[0] for m in members}
            if len(runs) != 1 or not all(m.isfile() and "/" in m.name for m in members):
                raise EditscaleError(f"merge: {archive} is not one packed run record (members {sorted(m.name for m in members)[:3]} ...)")
            run = runs.pop()
            dest = into / run
            if dest.exists():
                shutil.rmtree(dest)
            into.mkdir(parents=True, exist_ok=True)
            tar.extractall(into, filter="data")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise EditscaleError(f"merge: {archive} cannot be read as a packed run record: {e}") from e
    if not (dest / RECORD_FILE).is_file():
        raise EditscaleError(f"merge: {archive} holds no {run}/{RECORD_FILE}")
    return dest


def _is_packed(path: Path) -> bool:
    return path.is_file() and path.name.endswith(layout.RECORD_SUFFIX)


def find_records(sources: list[str | Path], unpack_into: str | Path) -> dict[str, list[tuple[Path, Path]]]:
    """run -> [(origin, record directory)] found among `sources`: each a record directory, a packed
    record (unpacked into `unpack_into`; the origin is the archive), or a directory holding either."""
    found: dict[str, list[tuple[Path, Path]]] = {}
    for src in map(Path, sources):
        if _is_packed(src) or (src / RECORD_FILE).is_file():
            origins = [src]
        elif src.is_dir():
            origins = sorted(d for d in src.iterdir() if (d / RECORD_FILE).is_file() or _is_packed(d))
        else:
            raise EditscaleError(f"merge: {src} is neither a directory nor a packed record (*{layout.RECORD_SUFFIX})")
        if not origins:
            raise EditscaleError(f"merge: {src} holds no run record ({RECORD_FILE} or *{layout.RECORD_SUFFIX}); make them with `editscale export-run`")
        for origin in origins:
            d = unpack_record(origin, Path(unpack_into) / origin.name[: -len(layout.RECORD_SUFFIX)]) if _is_packed(origin) else origin
            rec = json.loads((d / RECORD_FILE).read_text(encoding="utf-8"))
            found.setdefault(rec["run"], []).append((origin, d))
    return found


def check_records(config: dict, records: dict[str, dict], allow_missing: bool, statistics_per_machine: bool = False) -> list[str]:
    """Every disagreement between the records and the config (module doc), in one error; returns
    the config's runs that have no usable record (only with allow_missing). With
    statistics_per_machine, statistics must agree among one machine's runs only."""
    from . import workflow as wf

    problems, missing = [], []
    shared: dict[str, tuple[str, str]] = {}
    metric_config = {m: json.loads(wf.metric_params_json(config, m)) for m in wf.metrics_registry()}
    for run in config["runs"]:
        name = run["name"]
        rec = records.get(name)
        if rec is None:
            missing.append(name)
            continue
        run = recorded_run(run, rec)
        want = json.loads(canonical_json(wf.run_record(config, run)))
        got = {k: v for k, v in rec["run_record"].items() if k in want}  # run.json adds its provenance (config_hash)
        if got != want:
            diff = sorted(k for k in want if want.get(k) != got.get(k))
            problems.append(f"run {name}: its record was made with another run config (differs in {diff})")
        for m, params in metric_config.items():
            if rec["metric_config"].get(m) != params:
                problems.append(f"run {name}: metrics.{m} differs from this config's (record: {rec['metric_config'].get(m)}, config: {params})")
        for key, value in rec["shared"].items():
            slot = (key, rec["machine"] if statistics_per_machine and key.startswith(PRECOMPUTED) else "")
            if slot in shared and shared[slot][0] != value:
                other = shared[slot][1]
                why = "they must be the same to be compared"
                if key.startswith(PRECOMPUTED) and records[other]["machine"] != rec["machine"]:
                    why = (f"made on two machines, {rec['machine']!r} and {records[other]['machine']!r}, whose float32 rounding "
                           "differs (benchmarks/RESULTS.md 13): carry one machine's statistics to the other, or pass "
                           "--statistics-per-machine to let each machine's runs read their own")
                problems.append(f"{key}: run {name}'s record has {str(value)[:16]}, run {other}'s {str(shared[slot][0])[:16]} ({why})")
            shared.setdefault(slot, (value, name))
        have = set(rec["files"])
        short = [f for m in metric_config for f in (str(Path("metrics") / m / Path(p).name) for p in wf.metric_files(config, run, m))
                 if f not in have]
        if short:
            if allow_missing:
                missing.append(name)
            else:
                problems.append(f"run {name}: its record lacks {len(short)} metric file(s) of this config, e.g. {short[0]} "
                                f"(a shorter run, or other eval grids)")
    if missing and not allow_missing:
        problems.append(f"no record of run(s) {missing} (export them with `editscale export-run`, or pass --allow-missing)")
    if problems:
        raise EditscaleError(f"merge: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return missing


def shared_values(records: dict[str, dict]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What the records share: the values all of them agree on, and (where statistics were let
    differ between machines) per machine its runs that read statistics and their hashes."""
    keys = sorted({k for rec in records.values() for k in rec["shared"]})
    common: dict[str, Any] = {}
    for key in keys:
        values = {rec["shared"][key] for rec in records.values() if key in rec["shared"]}
        if len(values) == 1:
            common[key] = values.pop()
    machines: dict[str, dict[str, Any]] = {}
    for run, rec in sorted(records.items()):
        own = {k: v for k, v in rec["shared"].items() if k not in common}
        if own:
            entry = machines.setdefault(rec["machine"], {"machine": rec["machine"], "runs": [], "statistics": {}})
            entry["runs"].append(run)
            entry["statistics"].update(own)
    return common, sorted(machines.values(), key=lambda m: m["runs"][0])


def recorded_run(run: dict, record: dict) -> dict:
    """The config's run as its record has it: to the record's n_edits when it was exported as
    stopped (`export-run --until`)."""
    stopped = record.get("stopped")
    return {**run, "n_edits": int(stopped["reached"])} if stopped else run


def merge(config: dict, sources: list[str | Path], out: str | Path, allow_missing: bool = False, plots: bool = True,
          publish_to: str | Path | None = None, statistics_per_machine: bool = False) -> dict:
    """The study's tables, figures, audit and merge.json from the records in `sources`; with
    `publish_to`, the readers' results there too (editscale.report.publish); with
    `statistics_per_machine`, each machine's runs may read their own statistics (module doc)."""
    if publish_to and not plots:
        raise EditscaleError("merge: --publish needs the figures (drop --no-plots)")
    import polars as pl

    from . import workflow as wf
    from .config import section
    from .report.phases import PhaseConfig
    from .report.tables import report_tables

    out = Path(out)
    found = find_records(sources, out / "records")
    wanted = [r["name"] for r in config["runs"]]
    dup = {run: ds for run, ds in found.items() if run in wanted and len(ds) > 1}
    if dup:
        raise EditscaleError("merge: run(s) with more than one record: " + "; ".join(f"{r}: {[str(o) for o, _ in ds]}" for r, ds in dup.items()))
    dirs = {run: ds[0][1] for run, ds in found.items() if run in wanted}
    origins = {run: ds[0][0] for run, ds in found.items() if run in wanted}
    records = {run: json.loads((d / RECORD_FILE).read_text(encoding="utf-8")) for run, d in dirs.items()}
    run_by_name = {r["name"]: r for r in config["runs"]}
    for run, rec in records.items():  # the data the metrics read must be shared too (data_identity)
        rels = [Path("metrics") / m / Path(p).name for m in wf.metrics_registry()
                for p in wf.metric_files(config, recorded_run(run_by_name[run], rec), m)]
        rec["shared"] = {**rec["shared"], **data_identity(dirs[run], [rel for rel in rels if (dirs[run] / rel).exists()])}
    missing = check_records(config, records, allow_missing, statistics_per_machine)
    present = [recorded_run(r, records[r["name"]]) for r in config["runs"] if r["name"] in records and r["name"] not in missing]
    stopped = {r["name"]: records[r["name"]]["stopped"] for r in present if records[r["name"]].get("stopped")}
    if not present:
        raise EditscaleError("merge: none of the config's runs has a complete record")
    audit = [{"file": str(dirs[r["name"]] / f), "expected": sha, "actual": sha256_file(dirs[r["name"]] / f)}
             for r in present for f, sha in sorted(records[r["name"]]["files"].items())]
    hashed = {a["file"]: a["actual"] for a in audit}
    bad = [a for a in audit if a["expected"] != a["actual"]]
    if bad:
        raise EditscaleError(f"merge: {len(bad)} record file(s) changed since export, e.g. {bad[0]['file']} "
                             f"(sha256 {bad[0]['actual'][:16]}, recorded {bad[0]['expected'][:16]}); export the run again")
    metric_in = {r["name"]: [Path("metrics") / m / Path(p).name for m in wf.metrics_registry() for p in wf.metric_files(config, r, m)]
                 for r in present}  # each run's metric files, relative to its record
    metric_paths = [dirs[run] / rel for run, rels in metric_in.items() for rel in rels]
    # a record directory is named after its run: the report reads the run from the path ({run}/metrics/{m}/{k})
    for r in present:
        if dirs[r["name"]].name != r["name"]:
            raise EditscaleError(f"merge: the record of run {r['name']} is in {dirs[r['name']]}: its directory must be named after the run")
    edit_log = pl.concat([pl.read_parquet(dirs[r["name"]] / EDIT_LOG_FILE) for r in present], how="diagonal_relaxed")
    storage = {r["name"]: int(records[r["name"]]["storage_bytes"]) for r in present}
    cfg = section("report", config["report"])
    meta = json.loads(wf.runs_meta({"runs": present}))
    written = report_tables(meta, metric_paths, out / "tables", edit_log=edit_log, storage_bytes=storage, window=cfg.window,
                            counts=tuple(cfg.counts), phase_config=PhaseConfig.from_report(cfg))
    if plots:
        from .report.plots import FigureOptions, make_plots
        from .report.tables import read_tables

        written += make_plots(read_tables(out / "tables"), out / "plots", FigureOptions(smooth=cfg.smooth, norm_z=cfg.norm_z))
    common, per_machine = shared_values({r["name"]: records[r["name"]] for r in present})
    summary = {
        "runs": {r["name"]: {"record": str(origins[r["name"]]), "git_commit": records[r["name"]]["git_commit"],
                             "machine": records[r["name"]]["machine"], "job_seconds": records[r["name"]]["job_seconds"]}
                 for r in present},
        "missing": missing,
        "stopped": stopped,
        "shared": common,
        **({"statistics_per_machine": per_machine} if per_machine else {}),
        "metric_files": {str(p): hashed[str(p)] for p in metric_paths},  # hashed once, by the check above
        "tables": {str(p.relative_to(out)): sha256_file(p) for p in written if p.suffix in (".parquet", ".csv")},
    }
    write_json_atomic(out / "merge.json", summary)
    write_json_atomic(out / "audit.json", {"passed": True, "n_checks": len(audit), "failures": [], "checks": audit})
    if publish_to:
        from .report.publish import publish
        from .report.tables import read_tables

        where = Path(publish_to).resolve()
        prov = {
            "config_sha256": sha256_json(config_for_hash(config)),
            "runs": {r["name"]: {"record": _relative(origins[r["name"]], where), "made_by_commit": records[r["name"]]["git_commit"],
                                 "machine": records[r["name"]]["machine"], "job_seconds": records[r["name"]]["job_seconds"],
                                 "edits_sha256": records[r["name"]]["edits_sha256"]}
                     for r in present},
            "missing_runs": missing,
            "stopped_runs": stopped,
            "shared": summary["shared"],
            **({"statistics_per_machine": per_machine} if per_machine else {}),
            "record_files": {_relative(origins[run] / rel, where): summary["metric_files"][str(dirs[run] / rel)]
                             for run, rels in metric_in.items() for rel in rels},
            "regenerate": "editscale merge --configfile <config> --out <dir> --publish <this directory> <the records>",
        }
        publish(read_tables(out / "tables"), out / "plots", publish_to, prov)
    log.info("merged %d run(s) (%d missing) into %s", len(present), len(missing), out)
    return summary


def config_for_hash(config: dict) -> dict:
    """What a study's results depend on: its runs, metrics and report settings (not where it ran:
    resources, plugins' paths)."""
    return {k: config[k] for k in ("models", "datasets", "corpora", "runs", "metrics", "report") if k in config}


def _relative(path: Path, base: Path) -> str:
    import os

    return os.path.relpath(Path(path).resolve(), base)


def register(sub) -> None:
    e = sub.add_parser("export-run", help="write a finished run's small mergeable record (metric files, edit log, hashes)",
                       description="The record of one run of a config: its metric files byte for byte, the edit log of its "
                       "factors, the sha256 of the model, dataset and statistics it shares with other runs, and its job times "
                       "(editscale.merge). Commit it, or carry it to the machine that merges.")
    e.add_argument("--configfile", required=True)
    e.add_argument("--run", nargs="+", required=True, help="run name(s) of the config")
    e.add_argument("--results-root", default=".", help="the workflow directory the run was made in (holds data/ and results/)")
    e.add_argument("--out", required=True, help="records go to OUT/{run}/ (with --pack: OUT/{run}.record.tar.xz)")
    e.add_argument("--until", type=int, default=None, help="a chain stopped where its budget ended: the run to K edits (a segment "
                   "end), merged and published as stopped at K")
    e.add_argument("--reason", default=None, help="with --until: why the run stops there (recorded, published)")
    e.add_argument("--pack", action="store_true", help="write the record as one file, OUT/{run}.record.tar.xz (deterministic, "
                   "~40 %% of the directory's bytes: the form to commit)")
    e.set_defaults(func=run_export)
    a = sub.add_parser("audit", help="check provenance and hash chains, re-derive sampled checkpoints",
                       description="Audits the files the workflow declares (editscale.audit.audit): given by the audit rule "
                       "(--files), or by hand those of a config (--configfile, run in its workflow directory), so that a missing "
                       "declared file fails and a run dropped from the config is not audited. A passed audit writes OUT; a failed "
                       "one writes OUT's .failed.json beside it and removes OUT (the workflow then re-runs its own audit).")
    a.add_argument("--configfile", default="config.yaml", help="by hand: the config whose declared files are audited (default config.yaml)")
    a.add_argument("--files", nargs="+", default=None, help="the files to audit (the audit rule's declared inputs)")
    a.add_argument("--params-json", default="{}", help='with --files: the audit section, e.g. {"sample_checkpoints": 2, "seed": 0}')
    a.add_argument("--out", default=None, help="the report (default: the config's results/studies/<study>/audit.json, the audit rule's output)")
    a.set_defaults(func=run_audit)
    t = sub.add_parser("targets", help="the files that finish the given runs of a config (for `snakemake $(editscale targets ...)`)",
                       description="Prints the files that finish the runs (edit chain, every metric file, what the audit "
                       "checks), space-separated: `snakemake --cores all --configfile=C $(editscale targets --configfile C "
                       "--run R)` runs those runs alone, e.g. one per machine or per sitting; `editscale export-run` then "
                       "writes each one's record for `editscale merge`.")
    t.add_argument("--configfile", required=True)
    t.add_argument("--run", nargs="+", required=True)
    t.add_argument("--until", type=int, default=None, help="the files of the runs as chains stopped at edit K (a segment end "
                   "every metric evaluates): their edits and checkpoints up to K, what `export-run --until K` records")
    t.set_defaults(func=run_targets)
    m = sub.add_parser("merge", help="one study's tables, figures and audit from run records made in several places",
                       description="Checks that the records agree with the config and with each other (model, dataset, "
                       "statistics, editscale version), then builds the report tables (as the report_tables rule does), the "
                       "figures, merge.json and audit.json in OUT (editscale.merge).")
    m.add_argument("sources", nargs="+", help="record directories, packed records (*.record.tar.xz), or directories holding either")
    m.add_argument("--configfile", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--allow-missing", action="store_true", help="tables of the runs that have a complete record; the others listed")
    m.add_argument("--statistics-per-machine", action="store_true", help="runs made on different machines may read "
                   "statistics that differ (float32 rounding of each machine): they must agree among one machine's runs; "
                   "each machine's runs and hashes are named in merge.json, the provenance and results.md")
    m.add_argument("--no-plots", action="store_true")
    m.add_argument("--publish", default=None, help="also write the readers' results here (results.csv / .md, figures/*.png "
                   "under 300 kB, provenance.json: editscale.report.publish), e.g. docs/results/<study>")
    m.set_defaults(func=run_merge)


def run_audit(args) -> None:
    """`editscale audit`: the rule hands its declared files (--files); by hand, the same files of a
    config (workflow.audit_files) and its `audit:` section."""
    from .audit.audit import audit, write_report
    from .config import section
    from .workflow import audit_files, load_config, study_path

    if args.files is not None:
        if args.out is None:
            raise EditscaleError("audit --files needs --out (the audit rule's output)")
        try:
            params = json.loads(args.params_json)
        except json.JSONDecodeError as exc:
            raise EditscaleError(f"--params-json is not valid JSON: {exc}") from exc
        files, out = args.files, args.out
    else:
        config = load_config(args.configfile)
        files, params, out = audit_files(config), config["audit"], args.out or study_path(config, "audit.json")
    cfg = section("audit", params)
    result = audit(files, cfg.sample_checkpoints, cfg.seed)
    written = write_report(result, out)
    for f in result["failures"]:
        print(f"FAIL {f['check']}: {f['file']}: {f['detail']}", file=sys.stderr)
    print(f"audit {'PASSED' if result['passed'] else 'FAILED'}: {result['n_checks']} checks over {len(files)} files, "
          f"{len(result['failures'])} failed -> {written}", file=sys.stderr)
    if not result["passed"]:
        sys.exit(1)


def run_targets(args) -> None:
    from .workflow import load_config, run_by_name, run_targets as targets, stopped_run

    config = load_config(args.configfile)
    runs = [run_by_name(config, name) for name in args.run]
    if args.until is not None:
        runs = [stopped_run(config, run, args.until) for run in runs]
    print(" ".join(f for run in runs for f in targets(config, run)))


def run_export(args) -> None:
    from .workflow import load_config

    config = load_config(args.configfile)
    for name in args.run:
        export_run(config, name, args.out, args.results_root, until=args.until, reason=args.reason, pack=args.pack)


def run_merge(args) -> None:
    from .workflow import load_config

    summary = merge(load_config(args.configfile), args.sources, args.out, allow_missing=args.allow_missing, plots=not args.no_plots,
                    publish_to=args.publish, statistics_per_machine=args.statistics_per_machine)
    print(f"merged {len(summary['runs'])} run(s) into {args.out}" + (f"; missing: {summary['missing']}" if summary["missing"] else ""))
