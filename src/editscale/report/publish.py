"""A study's results for readers (docs/results/<study>/, `editscale merge --publish DIR`): the one
table a reader looks at first, as CSV and Markdown, the figures (PNG, each under MAX_PNG_BYTES) and
the provenance, all from the report tables, so that the merge of the committed run records
regenerates every committed table byte for byte. A figure whose drawing (SVG) did not change keeps
its committed PNG: each PNG names the SVG it was drawn from (small_png).

results.csv / results.md, one row per run, in the config's order:
  s_per_edit, steps_per_edit   the edit log's median seconds and mean optimizer steps per edit
                               (the median: a study run over several sittings on a shared machine
                               has edits that waited while it was paused or busy; steps: methods
                               that optimize v*; empty for closed-form / gradient-free ones)
  es / ps / ns_after_edit      mean efficacy, paraphrase and neighborhood scores of every edit
                               right after it was made (edit_scores)
  es / ps_at_end               the same edits re-scored at the last checkpoint (history)
  forgotten_pct_at_end         the share of successful edits forgotten by then (forgetting)
  perplexity_0, perplexity_end held-out perplexity of the unedited model and at the end
  downstream_0, downstream_end the probes' / tasks' mean accuracy (log-likelihood reading)
  onset_k, onset_ci            the detected onset of catastrophic forgetting and its bootstrap
                               interval ("none" when no curve shows one)
  early_fall_k, early_fall_ci  where a fast first fall of the decision curves ends (the reverse
                               shape: damage first, then a slower phase) and its interval
  early_fall_pct               the share of that curve's whole drop that came before it (%)
  first_to_fall                the downstream task whose own curve broke first, and how (an early
                               fall until k, or an onset at k; summary `first_to_fall`)
  leading_indicator, lead      the weight statistic that moved first, and by how many edits
  disabling_edits              how many single edits the detector flags

results.md ends with each machine's runs and statistics hashes when the merge let each machine's
runs read their own statistics (`editscale merge --statistics-per-machine`, provenance
`statistics_per_machine`).
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib
from pathlib import Path
from typing import Mapping

import polars as pl

from ..io import EditscaleError, atomic_path, write_json_atomic

MAX_PNG_BYTES = 300_000
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# the runs' overviews, one per run, together under this: 15 runs' overviews at MAX_PNG_BYTES would take
# 4.5 MB of the 10 MB docs/results holds; each gets its share (compacted, the 16 SmolLM2 200-edit runs'
# overviews fit theirs at scale 1.0; before compact_png they needed ~0.5)
OVERVIEWS_PNG_BYTES = 2_000_000
PNG_SCALES = (1.0, 0.8, 0.65, 0.5, 0.4)  # the first that keeps a figure under its bound
# the study's figures (every run in one chart), then each run's overview: the study's overview stacks
# one panel per run and outgrows MAX_PNG_BYTES at a few runs, a run's own stays readable
FIGURES = ("edit_scores", "forgetting", "downstream", "weight_distance", "update_norms")
# a published PNG's tEXt chunks: what it was drawn from, at which scale, by which renderer. A figure
# whose SVG is unchanged keeps its PNG, so that re-publishing with another (unpinned) vl-convert,
# whose rasterizer moves pixels but not the picture, leaves the committed bytes alone.
PNG_SOURCE, PNG_SCALE, PNG_RENDERER = "editscale-source", "editscale-scale", "editscale-renderer"

COLUMNS = {  # column -> what the Markdown header says
    "method": "method", "s_per_edit": "s/edit", "steps_per_edit": "steps/edit", "es_after_edit": "ES",
    "ps_after_edit": "PS", "ns_after_edit": "NS", "es_at_end": "ES at end", "ps_at_end": "PS at end",
    "forgotten_pct_at_end": "forgotten %", "perplexity_0": "ppl k=0", "perplexity_end": "ppl end",
    "downstream_0": "downstream k=0", "downstream_end": "downstream end", "onset_k": "onset", "onset_ci": "onset 95 % CI",
    "early_fall_k": "early fall", "early_fall_ci": "early fall 95 % CI", "early_fall_pct": "drop by then %",
    "first_to_fall": "first task to fall",
    "leading_indicator": "leading indicator", "lead": "lead (edits)", "disabling_edits": "disabling edits",
}


def _exact_mean(values) -> float | None:
    """The mean of the non-missing values, its sum exactly rounded (math.fsum), so independent of
    the rows' order: polars' group_by sums in partitions, and a run's mean moved in its last bit
    when another run joined the study's table."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    return math.fsum(kept) / len(kept) if kept else None


def _per_run(df: pl.DataFrame, value: str) -> dict[str, float]:
    """Per run, the mean of `value` (a case without such prompts: NaN, left out)."""
    if df.is_empty() or value not in df.columns:
        return {}
    return {run: _exact_mean(part[value].cast(pl.Float64).to_list())
            for (run,), part in df.group_by("run", maintain_order=True)}


def _at(df: pl.DataFrame, metric: str, first: bool) -> dict[str, float]:
    """Per run, the mean over items of `metric` at the run's first (k = 0) or last checkpoint."""
    if df.is_empty():
        return {}
    sel = df.filter(pl.col("metric") == metric)
    out = {}
    for (run,), part in sel.group_by("run", maintain_order=True):
        at = part["edit"].min() if first else part["edit"].max()
        out[run] = _exact_mean(part.filter(pl.col("edit") == at)["value"].to_list())
    return out


def results_table(tables: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """The study's one-row-per-run table (module doc) from the report tables."""
    summary = tables["summary"]
    log, scores = tables.get("edit_log", pl.DataFrame()), tables.get("edit_scores", pl.DataFrame())
    steps = _per_run(log, "steps")
    after = {q: _per_run(scores, q) for q in ("es", "ps", "ns")}
    ppl0, ppl1 = _at(tables["perplexity"], "perplexity", True), _at(tables["perplexity"], "perplexity", False)
    ds0, ds1 = _at(tables["downstream"], "accuracy_ll", True), _at(tables["downstream"], "accuracy_ll", False)
    rows = []
    for r in summary.iter_rows(named=True):
        run = r["run"]
        lo, hi = r.get("onset_ci_low"), r.get("onset_ci_high")
        flo, fhi, share = r.get("early_fall_ci_low"), r.get("early_fall_ci_high"), r.get("early_fall_share")
        rows.append({
            "run": run, "method": r["method"], "n_edits": r["n_edits"],
            "s_per_edit": r.get("edit_seconds_median"), "steps_per_edit": steps.get(run),
            "es_after_edit": after["es"].get(run), "ps_after_edit": after["ps"].get(run), "ns_after_edit": after["ns"].get(run),
            "es_at_end": r.get("es_at_last_checkpoint"), "ps_at_end": r.get("ps_at_last_checkpoint"),
            "forgotten_pct_at_end": r.get("forgotten_pct_at_end"),
            "perplexity_0": ppl0.get(run), "perplexity_end": ppl1.get(run),
            "downstream_0": ds0.get(run), "downstream_end": ds1.get(run),
            "onset_k": r.get("onset_k"), "onset_ci": f"{int(lo)}-{int(hi)}" if lo is not None and hi is not None else None,
            "early_fall_k": r.get("early_fall_k"),
            "early_fall_ci": f"{int(flo)}-{int(fhi)}" if flo is not None and fhi is not None else None,
            "early_fall_pct": 100 * share if share is not None else None,
            "first_to_fall": r.get("first_to_fall") if r.get("first_to_fall_k") is not None else None,
            "leading_indicator": r.get("leading_indicator"), "lead": r.get("indicator_lead"),
            "disabling_edits": r.get("n_disabling_edits"),
        })
    schema = {"run": pl.Utf8, "method": pl.Utf8, "n_edits": pl.Int64, "onset_ci": pl.Utf8, "leading_indicator": pl.Utf8,
              "onset_k": pl.Int64, "lead": pl.Int64, "disabling_edits": pl.Int64, "early_fall_k": pl.Int64, "early_fall_ci": pl.Utf8,
              "first_to_fall": pl.Utf8}
    return pl.DataFrame(rows, schema={c: schema.get(c, pl.Float64) for c in rows[0]} if rows else None)


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown(df: pl.DataFrame) -> str:
    cols = [c for c in COLUMNS if c in df.columns]
    lines = ["| " + " | ".join(COLUMNS[c] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in df.iter_rows(named=True)]
    return "\n".join(lines) + "\n"


def statistics_note(per_machine: list[dict]) -> str:
    """The Markdown lines under the table that say which runs read which machine's statistics."""
    if not per_machine:
        return ""
    lines = ["", "Statistics per machine (`editscale merge --statistics-per-machine`): second moments are float32 "
             "computations whose rounding differs between machines; each machine's runs read that machine's own.", ""]
    for m in per_machine:
        hashes = ", ".join(f"{Path(k.split(':', 1)[1]).stem} {str(v)[:12]}" for k, v in sorted(m["statistics"].items()))
        lines.append(f"- {m['machine']}: {', '.join(m['runs'])} ({hashes})")
    return "\n".join(lines) + "\n"


def overview_png_bytes(n_runs: int) -> int:
    """The bound on one run's overview PNG in a study of `n_runs` runs (OVERVIEWS_PNG_BYTES)."""
    return min(MAX_PNG_BYTES, OVERVIEWS_PNG_BYTES // max(n_runs, 1))


def png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks as (type, data), in order; the signature and every CRC checked."""
    if png[:8] != PNG_SIGNATURE:
        raise EditscaleError("not a PNG: its first 8 bytes are not the PNG signature")
    chunks, i = [], 8
    while i < len(png):
        if i + 12 > len(png):
            raise EditscaleError(f"PNG is truncated: {len(png) - i} bytes at byte {i} are too few for a chunk")
        (n,) = struct.unpack(">I", png[i:i + 4])
        kind, data = png[i + 4:i + 8], png[i + 8:i + 8 + n]
        if len(data) != n or struct.unpack(">I", png[i + 8 + n:i + 12 + n]) != (zlib.crc32(kind + data),):
            raise EditscaleError(f"PNG chunk {kind!r} at byte {i} is truncated or fails its CRC")
        chunks.append((kind, data))
        i += 12 + n
    return chunks


def compact_png(png: bytes) -> bytes:
    """The same PNG, its image data deflated again at zlib's highest level: the filtered scanlines
    and so every pixel are unchanged (vl-convert's encoder deflates fast; this is ~3x smaller for
    the study figures: benchmarks/RESULTS.md 14). Chunks other than IDAT are kept as they are."""
    chunks = png_chunks(png)
    first = next((i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT"), None)
    if first is None:
        raise EditscaleError("PNG has no IDAT chunk (no image data)")
    idat = zlib.compress(zlib.decompress(b"".join(data for kind, data in chunks if kind == b"IDAT")), 9)
    kept = [c for c in chunks if c[0] != b"IDAT"]
    kept.insert(first, (b"IDAT", idat))
    return png_bytes(kept)


def png_bytes(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these (type, data) chunks, each with its length and CRC (png_chunks' inverse)."""
    return PNG_SIGNATURE + b"".join(struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
                                    for kind, data in chunks)


def png_text(png: bytes) -> dict[str, str]:
    """A PNG's tEXt chunks as {keyword: text}."""
    return dict(data.decode("latin-1").split("\0", 1) for kind, data in png_chunks(png) if kind == b"tEXt")


def with_png_text(png: bytes, text: Mapping[str, str]) -> bytes:
    """The same PNG with one tEXt chunk per entry of `text`, right after IHDR (tEXt already there
    under those keywords dropped)."""
    chunks = [(kind, data) for kind, data in png_chunks(png)
              if kind != b"tEXt" or data.split(b"\0", 1)[0].decode("latin-1") not in text]
    added = [(b"tEXt", f"{key}\0{value}".encode("latin-1")) for key, value in text.items()]
    return png_bytes(chunks[:1] + added + chunks[1:])


def figure_source(svg: bytes, max_bytes: int) -> str:
    """What a published PNG is drawn from: its SVG's hash and its size bound."""
    return f"svg-sha256 {hashlib.sha256(svg).hexdigest()} max-bytes {max_bytes}"


def _kept_scale(out: Path, source: str) -> float | None:
    """The scale of the PNG already at `out` when it was drawn from `source`, else None."""
    try:
        text = png_text(out.read_bytes())
        return float(text[PNG_SCALE]) if text.get(PNG_SOURCE) == source else None
    except (OSError, EditscaleError, KeyError, ValueError, UnicodeDecodeError):
        return None  # absent, not a PNG, or not one of ours: drawn again


def small_png(svg_path: Path, out: Path, max_bytes: int = MAX_PNG_BYTES) -> float:
    """The figure's SVG rendered as PNG at the largest of PNG_SCALES that stays under
    `max_bytes` once compacted (compact_png); returns the scale. A PNG at `out` drawn from the same
    SVG and bound (its PNG_SOURCE text) is kept as it is."""
    from importlib.metadata import version

    import vl_convert as vlc

    svg = svg_path.read_bytes()
    source = figure_source(svg, max_bytes)
    kept = _kept_scale(out, source)
    if kept is not None:
        return kept
    svg_text, renderer = svg.decode("utf-8"), f"vl-convert-python {version('vl-convert-python')}"
    for scale in PNG_SCALES:
        png = with_png_text(compact_png(vlc.svg_to_png(svg_text, scale=scale)),
                            {PNG_SOURCE: source, PNG_SCALE: repr(scale), PNG_RENDERER: renderer})
        if len(png) < max_bytes:
            with atomic_path(out) as tmp:
                Path(tmp).write_bytes(png)
            return scale
    raise EditscaleError(f"{svg_path}: no PNG under {max_bytes} bytes even at scale {PNG_SCALES[-1]}")


def publish(tables: Mapping[str, pl.DataFrame], plots_dir: str | Path, out: str | Path, provenance: dict) -> list[Path]:
    """Write results.csv, results.md, figures/*.png and provenance.json to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = results_table(tables)
    written = [out / "results.csv", out / "results.md"]
    with atomic_path(written[0]) as tmp:
        df.write_csv(tmp)
    with atomic_path(written[1]) as tmp:
        Path(tmp).write_text(markdown(df) + statistics_note(provenance.get("statistics_per_machine", [])), encoding="utf-8")
    scales = {}
    for name in (*FIGURES, *(f"overview_{run}" for run in df["run"])):
        svg = Path(plots_dir) / f"{name}.svg"
        if svg.exists():
            (out / "figures").mkdir(exist_ok=True)
            bound = overview_png_bytes(df.height) if name.startswith("overview_") else MAX_PNG_BYTES
            scales[name] = small_png(svg, out / "figures" / f"{name}.png", bound)
            written.append(out / "figures" / f"{name}.png")
    write_json_atomic(out / "provenance.json", {**provenance, "figure_scales": scales})
    written.append(out / "provenance.json")
    return written
