"""`snakemake --report` on a finished tiny workflow run (config/test-tiny.yaml).

Snakemake 9 writes `--report X.html` as one self-contained HTML page (a React app; the results
are a JSON object `var results = {...}` in <script id="results"> whose entries carry each file
as a base64 data URI, with its rendered caption), and `--report X.zip` as a zip archive with the
raw files and a report.html. Both are checked against the files the workflow wrote.
(tests/report/screenshot_report.sh opens the page in headless Chromium.)
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import zipfile

import pytest

from benchmarks.snakemake_runs import snakemake

pytestmark = pytest.mark.workflow

FIGURES = ["edit_scores", "forgetting", "downstream", "weight_distance", "update_norms", "overview"]
PHASES = ["overview_rome-tiny"]  # each run's overview (category Phases)
PLOTS = "results/studies/test-tiny/plots"
EMBEDDED = {"results/studies/test-tiny/tables/summary.csv", f"{PLOTS}/figures.html"} | {f"{PLOTS}/{f}.png" for f in FIGURES + PHASES}


@pytest.fixture(scope="module")
def tiny_run(tiny_study, tmp_path_factory):
    """A copy of the session's finished tiny study (the report only reads it; `--report` writes
    beside it, so each module works on its own copy)."""
    workdir = tmp_path_factory.mktemp("report") / "wf"
    shutil.copytree(tiny_study, workdir, symlinks=True)
    return workdir


def _script_json(page: str, script_id: str):
    m = re.search(rf'<script id="{script_id}">\s*var \w+ = (.*?);?\s*</script>', page, re.S)
    assert m, f"no <script id={script_id!r}> in the report"
    return json.loads(m.group(1))


def _decode(data_uri: str) -> bytes:
    header, _, payload = data_uri.partition(",")
    assert header.startswith("data:") and header.endswith(";base64"), header[:80]
    return base64.b64decode(payload)


def _text(caption_html: str) -> str:
    return " ".join(html.unescape(re.sub(r"<[^>]+>", "", caption_html)).split())


def test_report_html_is_self_contained_with_every_figure(tiny_run):
    res = snakemake(tiny_run, "--report", "results/studies/test-tiny/report.html")
    assert res.returncode == 0 and "Report created" in res.stdout + res.stderr
    page = (tiny_run / "results/studies/test-tiny/report.html").read_text(encoding="utf-8")
    assert page.lstrip().lower().startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    # Self-contained: no script, stylesheet or image is fetched from elsewhere.
    assert not re.search(r'<(script|link|img)\b[^>]*\b(src|href)="(https?:)?//', page, re.I)

    results = _script_json(page, "results")
    assert set(results) == EMBEDDED
    for path, entry in results.items():
        # every file is embedded byte for byte
        assert _decode(entry["data_uri"]) == (tiny_run / path).read_bytes(), path
        assert entry["mime_type"] == {"csv": "text/csv", "html": "text/html", "png": "image/png"}[path.rsplit(".", 1)[1]]
    assert _decode(results[f"{PLOTS}/edit_scores.png"]["data_uri"])[:8] == b"\x89PNG\r\n\x1a\n"
    figures_page = _decode(results[f"{PLOTS}/figures.html"]["data_uri"]).decode()
    assert "vegaEmbed" in figures_page and "Editing proficiency" in figures_page and "Phases of every run" in figures_page

    categories = _script_json(page, "categories")
    assert {"Phases", "Figures", "Figures (interactive)", "Tables"} <= set(categories)
    in_figures = json.dumps(categories["Figures"])
    assert all(f"{PLOTS}/{f}.png" in in_figures for f in FIGURES)
    assert all(f"{PLOTS}/{f}.png" in json.dumps(categories["Phases"]) for f in PHASES)


def test_the_report_holds_vegas_scripts_once_and_opens_on_the_phases(tiny_run):
    if not (tiny_run / "results/studies/test-tiny/report.html").exists():
        snakemake(tiny_run, "--report", "results/studies/test-tiny/report.html")
    page = (tiny_run / "results/studies/test-tiny/report.html").read_text(encoding="utf-8")
    results = _script_json(page, "results")
    bundle = (tiny_run / PLOTS / "vega-embed.js").read_text()
    # vega's scripts are in the report once, in the one interactive page: not once per figure
    assert sum(_decode(e["data_uri"]).decode(errors="replace").count(bundle) for e in results.values()) == 1
    embedded = sum(len(e["data_uri"]) for e in results.values())
    assert embedded < 2 * len(bundle) + 4 * sum((tiny_run / p).stat().st_size for p in EMBEDDED if p.endswith(".png"))
    # the landing page (the workflow description) opens on every run's phases: the study overview's SVG
    desc = json.loads(re.search(r"var workflow_desc = (.*?);?\n", page).group(1))
    assert desc.index("Phases of every run at a glance") < desc.index("editscale study:")
    glance = desc[desc.index('class="editscale-glance"'):]
    assert glance.index("<svg") < 100 and "rome-tiny: no onset of catastrophic forgetting detected" in glance


def test_report_captions_name_the_run(tiny_run):
    if not (tiny_run / "results/studies/test-tiny/report.html").exists():
        snakemake(tiny_run, "--report", "results/studies/test-tiny/report.html")
    results = _script_json((tiny_run / "results/studies/test-tiny/report.html").read_text(encoding="utf-8"), "results")
    summary = _text(results["results/studies/test-tiny/tables/summary.csv"]["caption"])
    assert ("Runs: rome-tiny (rome on tiny-gpt2, hparams config/hparams/rome/tiny.yaml, dataset geofacts, sample 0, "
            "6 sequential edits, segment 3, 1 edit(s) per step).") in summary, summary
    assert "onset of catastrophic forgetting" in summary
    for path in [f"{PLOTS}/figures.html", *(f"{PLOTS}/{f}.png" for f in FIGURES)]:
        caption = _text(results[path]["caption"])
        assert "{{" not in caption and "{%" not in caption  # the Jinja templates were rendered
        # config report.smooth (default 10) is named only where a run has more edits (the tiny run: 6)
        assert "smoothed over" not in caption and "Each method has one colour in every figure" in caption
        assert "rome-tiny (rome on tiny-gpt2, hparams config/hparams/rome/tiny.yaml, dataset geofacts" in caption, caption
    assert "rolling mean over 10 edits when a run has more edits than that" in _text(results[f"{PLOTS}/overview_rome-tiny.png"]["caption"])
    # The embedded table is the run's summary.
    csv = _decode(results["results/studies/test-tiny/tables/summary.csv"]["data_uri"]).decode()
    assert csv.splitlines()[0].startswith("run,") and any(line.startswith("rome-tiny,") for line in csv.splitlines()[1:])


def test_report_zip_holds_raw_files_and_page(tiny_run):
    snakemake(tiny_run, "--report", "results/studies/test-tiny/report.zip")
    with zipfile.ZipFile(tiny_run / "results/studies/test-tiny/report.zip") as zf:
        names = zf.namelist()
        assert "report/report.html" in names
        raw = {n.rsplit("/", 1)[1]: n for n in names if n.startswith("report/data/raw/")}
        assert set(raw) == {p.rsplit("/", 1)[1] for p in EMBEDDED}
        assert zf.read(raw["edit_scores.png"]) == (tiny_run / "results/studies/test-tiny/plots/edit_scores.png").read_bytes()
        assert zf.read(raw["summary.csv"]) == (tiny_run / "results/studies/test-tiny/tables/summary.csv").read_bytes()
        assert b"rome-tiny" in zf.read("report/report.html")
