"""Run records and merged studies (issue 29 item 1): a finished run exported as a small record,
records from several places merged into one study's tables, and every disagreement refused.

The session's tiny study is only read: its run is exported, and the records are edited copies."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from editscale.io import EditscaleError
from editscale.merge import RECORD_FILE, export_run, merge
from editscale.workflow import load_config

pytestmark = pytest.mark.workflow
RUN = "rome-tiny"


@pytest.fixture(scope="module")
def record(tiny_study, tmp_path_factory):
    out = tmp_path_factory.mktemp("records")
    export_run(load_config(tiny_study / "config/test-tiny.yaml"), RUN, out, tiny_study)
    return out / RUN


def _copy_record(record: Path, dest: Path, edit=None) -> Path:
    shutil.copytree(record, dest)
    if edit:
        rec = json.loads((dest / RECORD_FILE).read_text())
        edit(rec)
        (dest / RECORD_FILE).write_text(json.dumps(rec))
    return dest


def test_a_record_is_small_and_holds_the_runs_metric_files_byte_for_byte(tiny_study, record):
    rec = json.loads((record / RECORD_FILE).read_text())
    metric_files = sorted((tiny_study / "results" / RUN / "metrics").rglob("*.parquet"))
    assert metric_files and len([f for f in rec["files"] if f.startswith("metrics/")]) == len(metric_files)
    for f in metric_files:
        assert (record / f.relative_to(tiny_study / "results" / RUN)).read_bytes() == f.read_bytes()
    assert not list(record.rglob("*.h5"))  # no deltas or factors: the edit log and the bytes they take instead
    assert rec["storage_bytes"] == sum(p.stat().st_size for sub in ("deltas", "factors")
                                       for p in (tiny_study / "results" / RUN / sub).glob("*.h5"))
    assert set(rec["shared"]) >= {"editscale_version", "model:tiny-gpt2", "dataset:geofacts"}
    assert any(k.startswith("precomputed:results/stats/tiny-gpt2/") for k in rec["shared"])  # ROME's second moment
    assert rec["job_seconds"]["jobs"] > 0 and rec["job_seconds"]["edit_s"] > 0
    assert sum(p.stat().st_size for p in record.rglob("*") if p.is_file()) < 500_000


def test_merged_tables_are_byte_identical_to_the_workflows(tiny_study, record, tmp_path):
    exe = str(Path(sys.executable).parent / "editscale")
    res = subprocess.run([exe, "merge", "--configfile", "config/test-tiny.yaml", "--out", str(tmp_path / "merged"),
                          str(record.parent)], cwd=tiny_study, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ours, theirs = tmp_path / "merged" / "tables", tiny_study / "results/studies/test-tiny/tables"
    names = sorted(p.name for p in theirs.iterdir())
    assert names == sorted(p.name for p in ours.iterdir())
    for name in names:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name
    summary = json.loads((tmp_path / "merged" / "merge.json").read_text())
    assert summary["missing"] == [] and set(summary["runs"]) == {RUN}
    assert all(Path(p).is_relative_to(record) for p in summary["metric_files"])  # the tables say which files they came from
    assert json.loads((tmp_path / "merged" / "audit.json").read_text())["passed"]
    assert (tmp_path / "merged" / "plots" / "edit_scores.png").exists()


def test_a_changed_record_file_is_refused_naming_it(tiny_study, record, tmp_path):
    bad = _copy_record(record, tmp_path / "recs" / RUN)
    target = sorted((bad / "metrics" / "history").glob("*.parquet"))[-1]
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(EditscaleError, match=f"record file\\(s\\) changed since export, e.g. .*{target.name}"):
        merge(load_config(tiny_study / "config/test-tiny.yaml"), [bad.parent], tmp_path / "out", plots=False)


def test_records_that_disagree_are_refused_with_every_problem(tiny_study, record, tmp_path):
    """A second run of the config whose record claims another model sha256 and another metric
    setting, while the config's hparams of the first run changed: one error names all three."""
    config = load_config(tiny_study / "config/test-tiny.yaml")
    twin = dict(config["runs"][0], name="rome-tiny-b")
    config["runs"].append(twin)

    def other(rec):
        rec["run"] = rec["meta"]["name"] = "rome-tiny-b"
        rec["run_record"]["name"] = "rome-tiny-b"
        rec["shared"]["model:tiny-gpt2"] = "0" * 64
        rec["metric_config"]["history"]["batch_size"] = 7

    recs = tmp_path / "recs"
    _copy_record(record, recs / RUN)
    _copy_record(record, recs / "rome-tiny-b", other)
    config["runs"][0]["hparams_overrides"] = {"v_num_grad_steps": 3}
    with pytest.raises(EditscaleError) as err:
        merge(config, [recs], tmp_path / "out", plots=False)
    text = str(err.value)
    assert "3 problem(s)" in text
    assert "run rome-tiny: its record was made with another run config (differs in ['hparams', 'hparams_overrides'])" in text
    assert "run rome-tiny-b: metrics.history differs" in text
    assert "model:tiny-gpt2: run rome-tiny-b's record has 0000000000000000" in text


def test_records_whose_metrics_read_different_data_are_refused(tiny_study, record, tmp_path):
    """Two runs whose perplexities were taken on different corpora (a self-sample made on another
    CPU, say) are not comparable: merge names the data file, although each record is intact."""
    import polars as pl

    from editscale.io import read_parquet_metadata, sha256_file, write_parquet_atomic

    config = load_config(tiny_study / "config/test-tiny.yaml")
    config["runs"].append(dict(config["runs"][0], name="rome-tiny-b"))

    def rename(rec):
        rec["run"] = rec["meta"]["name"] = rec["run_record"]["name"] = "rome-tiny-b"

    recs = tmp_path / "recs"
    _copy_record(record, recs / RUN)
    twin = _copy_record(record, recs / "rome-tiny-b", rename)
    rec = json.loads((twin / RECORD_FILE).read_text())
    changed = sorted((twin / "metrics" / "perplexity").glob("*.parquet"))
    assert changed
    for f in changed:  # the twin's metric files as an export from another corpus would hold them
        meta = read_parquet_metadata(f)
        inputs = json.loads(meta["inputs"])
        assert isinstance(inputs["tokens"], str)
        meta["inputs"] = json.dumps({**inputs, "tokens": "f" * 64})
        write_parquet_atomic(pl.read_parquet(f), f, {k: v for k, v in meta.items() if k != "table_sha256"})
        rec["files"][str(f.relative_to(twin))] = sha256_file(f)
    (twin / RECORD_FILE).write_text(json.dumps(rec))
    with pytest.raises(EditscaleError, match=r"1 problem\(s\):\n  data:tokens: run rome-tiny-b's record has ffffffffffffffff, run rome-tiny's"):
        merge(config, [recs], tmp_path / "out", plots=False)
    summary = merge(config, [recs / RUN], tmp_path / "out1", allow_missing=True, plots=False)
    assert summary["shared"]["data:tokens"] == json.loads(read_parquet_metadata(sorted((record / "metrics/perplexity").glob("*"))[0])["inputs"])["tokens"]


def test_statistics_made_on_two_machines_merge_only_when_each_machines_runs_read_their_own(tiny_study, record, tmp_path):
    """The statistics are float32 sums whose rounding differs between machines: a run made on
    another machine with its own statistics is refused with the reason and the flag; with
    --statistics-per-machine it merges, and merge.json and results.md say which runs read which
    machine's; within one machine the statistics must still agree."""
    from editscale.merge import shared_values
    from editscale.report.publish import statistics_note

    config = load_config(tiny_study / "config/test-tiny.yaml")
    config["runs"].append(dict(config["runs"][0], name="rome-tiny-b"))
    stats_key = next(k for k in json.loads((record / RECORD_FILE).read_text())["shared"] if k.startswith("precomputed:"))

    def elsewhere(machine):
        def edit(rec):
            rec["run"] = rec["meta"]["name"] = rec["run_record"]["name"] = "rome-tiny-b"
            rec["shared"][stats_key] = "e" * 64
            rec["machine"] = machine
        return edit

    recs = tmp_path / "recs"
    _copy_record(record, recs / RUN)
    _copy_record(record, recs / "rome-tiny-b", elsewhere("Other CPU | 64 | cuda | NVIDIA H100 | 2.13.0"))
    with pytest.raises(EditscaleError) as err:
        merge(config, [recs], tmp_path / "out", plots=False)
    text = str(err.value)
    assert "1 problem(s)" in text and f"{stats_key}: run rome-tiny-b's record has eeeeeeeeeeeeeeee" in text
    assert "made on two machines, 'Other CPU | 64 | cuda | NVIDIA H100 | 2.13.0' and" in text and "--statistics-per-machine" in text

    summary = merge(config, [recs], tmp_path / "out", plots=False, statistics_per_machine=True)
    mine = json.loads((record / RECORD_FILE).read_text())
    assert stats_key not in summary["shared"] and summary["shared"]["model:tiny-gpt2"] == mine["shared"]["model:tiny-gpt2"]
    assert summary["statistics_per_machine"] == sorted(
        [{"machine": mine["machine"], "runs": [RUN], "statistics": {stats_key: mine["shared"][stats_key]}},
         {"machine": "Other CPU | 64 | cuda | NVIDIA H100 | 2.13.0", "runs": ["rome-tiny-b"], "statistics": {stats_key: "e" * 64}}],
        key=lambda m: m["runs"][0])
    assert json.loads((tmp_path / "out" / "merge.json").read_text())["statistics_per_machine"] == summary["statistics_per_machine"]
    note = statistics_note(summary["statistics_per_machine"])
    assert f"- Other CPU | 64 | cuda | NVIDIA H100 | 2.13.0: rome-tiny-b ({Path(stats_key).stem} eeeeeeeeeeee)" in note

    shutil.rmtree(recs / "rome-tiny-b")  # the same machine's runs must still share theirs
    _copy_record(record, recs / "rome-tiny-b", elsewhere(mine["machine"]))
    with pytest.raises(EditscaleError, match=f"{stats_key}: run rome-tiny-b's record has eeeeeeeeeeeeeeee.*must be the same"):
        merge(config, [recs], tmp_path / "out2", plots=False, statistics_per_machine=True)
    assert shared_values({RUN: mine})[1] == []  # one machine, one set: nothing per machine


def test_a_missing_run_is_an_error_unless_allowed(tiny_study, record, tmp_path):
    config = load_config(tiny_study / "config/test-tiny.yaml")
    config["runs"].append(dict(config["runs"][0], name="rome-tiny-b"))
    with pytest.raises(EditscaleError, match=r"no record of run\(s\) \['rome-tiny-b'\]"):
        merge(config, [record.parent], tmp_path / "out", plots=False)
    summary = merge(config, [record.parent], tmp_path / "out", allow_missing=True, plots=False)
    assert summary["missing"] == ["rome-tiny-b"] and list(summary["runs"]) == [RUN]


def test_an_unfinished_run_cannot_be_exported(tiny_study, tmp_path):
    config = load_config(tiny_study / "config/test-tiny.yaml")
    config["runs"][0]["n_edits"] = 9  # three more edits than were made
    with pytest.raises(EditscaleError, match="run rome-tiny is not finished .* e.g. .*000009"):
        export_run(config, RUN, tmp_path, tiny_study)
    assert not list(tmp_path.iterdir())


def test_published_results_are_regenerated_byte_for_byte_from_the_records(tiny_study, record, tmp_path):
    """`merge --publish`: results.csv / .md hold the run's one row (the edit scores right after
    each edit, the same edits at the end, perplexity and downstream k = 0 -> end), figures are
    PNGs under 300 kB, provenance names each record file; a second merge of the same records
    writes the same bytes."""
    import polars as pl

    from editscale.report.publish import MAX_PNG_BYTES, overview_png_bytes

    config = load_config(tiny_study / "config/test-tiny.yaml")
    pub = tmp_path / "pub"
    merge(config, [record.parent], tmp_path / "out", publish_to=pub)
    res = pl.read_csv(pub / "results.csv")
    assert res["run"].to_list() == [RUN] and res["n_edits"][0] == 6
    scores = pl.read_parquet(tiny_study / "results/studies/test-tiny/tables/edit_scores.parquet")
    assert res["es_after_edit"][0] == pytest.approx(scores["es"].mean())
    ppl = pl.read_parquet(tiny_study / "results/studies/test-tiny/tables/perplexity.parquet").filter(pl.col("metric") == "perplexity")
    assert res["perplexity_0"][0] == pytest.approx(ppl.filter(pl.col("edit") == 0)["value"][0])
    assert res["perplexity_end"][0] == pytest.approx(ppl.filter(pl.col("edit") == 6)["value"][0])
    # s/edit: the median of the edit log's seconds (robust to a paused or shared machine)
    seconds = pl.read_parquet(tiny_study / "results/studies/test-tiny/tables/edit_log.parquet")["seconds"]
    assert res["s_per_edit"][0] == pytest.approx(seconds.median()) and seconds.median() != seconds.mean()
    assert "| method | s/edit | steps/edit | ES |" in (pub / "results.md").read_text()
    pngs = sorted((pub / "figures").glob("*.png"))
    assert {p.stem for p in pngs} >= {"edit_scores", "forgetting", f"overview_{RUN}"}
    assert all(p.stat().st_size < MAX_PNG_BYTES for p in pngs)
    assert overview_png_bytes(1) == MAX_PNG_BYTES and overview_png_bytes(15) == 133_333  # 15 runs' overviews share 2 MB
    prov = json.loads((pub / "provenance.json").read_text())
    assert set(prov["runs"]) == {RUN} and prov["runs"][RUN]["made_by_commit"]
    assert len(prov["record_files"]) == len([f for f in json.loads((record / RECORD_FILE).read_text())["files"] if f.startswith("metrics/")])
    before = {p.name: p.read_bytes() for p in (pub / "results.csv", pub / "results.md")}
    merge(config, [record.parent], tmp_path / "out2", publish_to=pub)
    assert {p.name: p.read_bytes() for p in (pub / "results.csv", pub / "results.md")} == before


def test_a_chain_stopped_where_its_budget_ended_is_merged_at_its_last_segment(tiny_study, tmp_path):
    """Issue 29 item 3: a chain that cannot run to its n_edits is exported as stopped (--until K
    --reason) and merged at K, with the reason in merge.json: planned 9 edits, stopped at 6, the
    tables are the workflow's own for 6, byte for byte. A K that is no segment end, or that a
    metric does not evaluate, or no reason, is refused."""
    config = load_config(tiny_study / "config/test-tiny.yaml")
    config["runs"][0]["n_edits"] = 9  # the plan; the tiny study's run reached 6
    with pytest.raises(EditscaleError, match=r"--until 4: must be a segment end \(a multiple of 3\) below the run rome-tiny's n_edits 9"):
        export_run(config, RUN, tmp_path / "bad", tiny_study, until=4, reason="budget")
    with pytest.raises(EditscaleError, match=r"say why the run rome-tiny stops there \(--reason\)"):
        export_run(config, RUN, tmp_path / "bad", tiny_study, until=6)
    # 3 is a segment end, but downstream and others evaluate 0, 6, 9: a record at 3 would need a
    # checkpoint no rule of the whole run makes
    with pytest.raises(EditscaleError, match=r"--until 3: run rome-tiny evaluates no checkpoint there for downstream, .*"
                       r"\(the downstream grid has 0, then 6\); stop where every metric evaluates$"):
        export_run(config, RUN, tmp_path / "bad", tiny_study, until=3, reason="budget")
    with pytest.raises(EditscaleError, match=r"--until 6: run rome-tiny lacks \d+ file\(s\) due up to edit 6 in .*: run its jobs up "
                       r"to there first, `snakemake \$\(editscale targets --configfile <config> --run rome-tiny --until 6\)`"):
        export_run(config, RUN, tmp_path / "bad", tmp_path / "elsewhere", until=6, reason="budget")
    rec_dir = export_run(config, RUN, tmp_path / "records", tiny_study, until=6, reason="the session's budget ended")
    rec = json.loads((rec_dir / RECORD_FILE).read_text())
    assert rec["n_edits"] == 6 and rec["stopped"] == {"reached": 6, "planned": 9, "reason": "the session's budget ended"}
    summary = merge(config, [tmp_path / "records"], tmp_path / "merged", plots=False)
    assert summary["stopped"] == {RUN: rec["stopped"]} and summary["missing"] == []
    theirs = tiny_study / "results/studies/test-tiny/tables"
    for p in sorted(theirs.glob("*.parquet")):
        assert (tmp_path / "merged/tables" / p.name).read_bytes() == p.read_bytes(), p.name


def test_targets_until_lists_what_a_chain_stopped_there_needs(tiny_study, tmp_path):
    """`editscale targets --until K`: the files of a run planned longer, up to K, are the files of
    the same run planned to K (what `export-run --until K` records), and a K that some metric
    does not evaluate is one error before any job runs."""
    import yaml

    exe = str(Path(sys.executable).parent / "editscale")
    cfg = yaml.safe_load((tiny_study / "config/test-tiny.yaml").read_text())
    cfg["runs"][0]["n_edits"] = 9
    nine = tmp_path / "nine.yaml"
    nine.write_text(yaml.safe_dump(cfg))

    def targets(configfile, *extra):
        return subprocess.run([exe, "targets", "--configfile", str(configfile), "--run", RUN, *extra], cwd=tiny_study,
                              capture_output=True, text=True)

    stopped, six = targets(nine, "--until", "6"), targets(tiny_study / "config/test-tiny.yaml")
    assert stopped.returncode == 0 and six.returncode == 0, stopped.stderr + six.stderr
    assert stopped.stdout.split() == six.stdout.split()
    assert f"results/{RUN}/deltas/000006.h5" in stopped.stdout and "000009" not in stopped.stdout
    assert "000009" in targets(nine).stdout
    bad = targets(nine, "--until", "3")
    assert bad.returncode == 2 and bad.stdout == ""  # the CLI's exit status for an EditscaleError
    assert "--until 3: run rome-tiny evaluates no checkpoint there for downstream" in bad.stderr


def test_a_packed_record_is_deterministic_smaller_and_merges_to_the_same_tables(tiny_study, record, tmp_path):
    """`export-run --pack`: one .record.tar.xz that re-exports to the same bytes, smaller than the
    directory, and merges to the directory record's tables byte for byte; merge.json and the
    published provenance name the archive."""
    from editscale.layout import RECORD_SUFFIX

    config = load_config(tiny_study / "config/test-tiny.yaml")
    packed = export_run(config, RUN, tmp_path / "a", tiny_study, pack=True)
    again = export_run(config, RUN, tmp_path / "b", tiny_study, pack=True)
    assert packed.name == RUN + RECORD_SUFFIX and packed.read_bytes() == again.read_bytes()
    assert not (tmp_path / "a" / RUN).exists() and not list((tmp_path / "a").glob("*.partial"))
    dir_bytes = sum(p.stat().st_size for p in record.rglob("*") if p.is_file())
    assert packed.stat().st_size < 0.7 * dir_bytes, (packed.stat().st_size, dir_bytes)
    summary = merge(config, [packed], tmp_path / "from-pack", publish_to=tmp_path / "pub")
    merge(config, [record.parent], tmp_path / "from-dir", plots=False)
    tables = sorted(p.name for p in (tmp_path / "from-dir" / "tables").iterdir())
    assert tables and all((tmp_path / "from-pack" / "tables" / t).read_bytes() == (tmp_path / "from-dir" / "tables" / t).read_bytes()
                          for t in tables)
    assert summary["runs"][RUN]["record"] == str(packed)
    prov = json.loads((tmp_path / "pub" / "provenance.json").read_text())
    assert prov["runs"][RUN]["record"] == f"../a/{packed.name}"
    assert prov["record_files"] and all(f.startswith(f"../a/{packed.name}/metrics/") for f in prov["record_files"])
    # a directory holding packed records is a source too; a damaged archive is one error naming it
    assert list(merge(config, [tmp_path / "a"], tmp_path / "from-dir-of-packs", plots=False)["runs"]) == [RUN]
    bad = tmp_path / "bad" / packed.name
    bad.parent.mkdir()
    bad.write_bytes(packed.read_bytes()[: len(packed.read_bytes()) // 2])
    with pytest.raises(EditscaleError, match=f"merge: {bad} cannot be read as a packed run record"):
        merge(config, [bad], tmp_path / "out-bad", plots=False)


@pytest.mark.slow  # three snakemake calls on the tiny study (~150 s)
def test_the_run_record_rule_writes_the_record_export_run_packs(tiny_study, tmp_path):
    """`snakemake results/records/<run>.record.tar.xz` finishes the run (here: already finished, so
    only the export runs) and writes the same bytes as `editscale export-run --pack` by hand; the
    default target makes no record."""
    from benchmarks.snakemake_runs import planned_jobs, snakemake

    workdir = tmp_path / "study"
    shutil.copytree(tiny_study, workdir, symlinks=True)
    target = f"results/records/{RUN}.record.tar.xz"
    assert planned_jobs(snakemake(workdir, "-n", target)) == {"run_record": 1}
    snakemake(workdir, target)
    by_hand = tmp_path / "by-hand"
    export_run(load_config(workdir / "config/test-tiny.yaml"), RUN, by_hand, workdir, pack=True)
    assert (workdir / target).read_bytes() == (by_hand / f"{RUN}.record.tar.xz").read_bytes()
    assert planned_jobs(snakemake(workdir, "-n")) == {}


def test_the_run_record_rule_needs_one_config_file():
    from editscale.workflow import single_configfile

    assert single_configfile(["config/methods.yaml"]) == "config/methods.yaml"
    with pytest.raises(EditscaleError, match=r"one config file, not 2 \(a.yaml, b.yaml\).*export-run` by hand"):
        single_configfile(["a.yaml", "b.yaml"])
