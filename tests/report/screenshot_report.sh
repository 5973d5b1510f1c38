#!/usr/bin/env bash
# Open the Snakemake report and a figure of an editscale run in headless Chromium, take
# screenshots, and check that they show a chart (not a blank or single-colour page).
#
#   tests/report/screenshot_report.sh [-o OUT_DIR] [WORKDIR]
#
# WORKDIR: a directory with a finished run (results/studies/<study>/plots/edit_scores.html). Its
#   results/studies/<study>/report.html is made with `snakemake --report` (config: $CONFIG, default config.yaml)
#   when missing. Without WORKDIR, the workflow files of this checkout are copied into a temporary
#   directory and the tiny study (config/test-tiny.yaml, a few minutes on CPU) is run there first
#   (the directory is removed at the end unless KEEP_WORKDIR=1).
# OUT_DIR (default: ./report-screenshots) receives
#   report-home.png         the study's report.html as it opens: the phases of every run at a glance
#                           (the study overview's SVG in the description), the workflow graph
#   report-figures.png      the same report showing "Figures (interactive)" > figures.html in its viewer
#                           (a copy of report.html with a script that opens that view)
#   figures.png             the study's plots/figures.html (every figure on one page) on its own
#   edit_scores.png         the study's plots/edit_scores.html on its own (vega from the folder's bundle)
#   chromium.log            Chromium's stderr (dbus warnings are harmless in a container)
# Checks: each screenshot decodes, is not tiny, not blank (distinct colours, non-background share)
# and shows ROME's line colour (#4c78a8); every plots/*.png decodes, shows a chart and stays under
# 1 MB; the DOM Chromium rendered (--dump-dom; kept as *.dom.html with KEEP_DOM=1) has the report's
# menu (Workflow, Statistics, Phases, Figures, Figures (interactive), Tables), the study overview
# on the landing page, every figure of figures.html rendered by vega (one <svg class="marks"> per
# figure, the phases first) and edit_scores.html's chart with its title "Editing proficiency".
#
# Needs chromium (installed with apt-get when missing and run as root) and python3 (stdlib
# only: the PNGs are decoded with zlib). Exit status 0 when every check passed.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="$PWD/report-screenshots"
while getopts "o:h" opt; do
  case "$opt" in
    o) OUT="$OPTARG" ;;
    h) sed -n '2,30p' "$0"; exit 0 ;;
    *) exit 2 ;;
  esac
done
shift $((OPTIND - 1))
WORKDIR="${1:-}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
PY="${PYTHON:-python3}"

if [ ! -x "$CHROMIUM" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing chromium (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    echo "error: $CHROMIUM not found; install the Debian package 'chromium' (apt-get install chromium)" >&2
    exit 1
  fi
fi

if [ -z "$WORKDIR" ]; then
  command -v snakemake >/dev/null || { [ -x "$REPO/.venv/bin/snakemake" ] && export PATH="$REPO/.venv/bin:$PATH"; }
  TMPRUN="$(mktemp -d)"
  [ -n "${KEEP_WORKDIR:-}" ] || trap 'rm -rf "$TMPRUN"' EXIT
  WORKDIR="$TMPRUN/wf"
  mkdir -p "$WORKDIR"
  for f in Snakefile config.yaml config rules envs profiles report; do cp -r "$REPO/$f" "$WORKDIR/"; done
  CONFIG="${CONFIG:-config/test-tiny.yaml}"
  echo "== running the tiny study in $WORKDIR ($CONFIG)"
  (cd "$WORKDIR" && snakemake --cores all --configfile "$CONFIG" >"$OUT/snakemake.log" 2>&1) \
    || { tail -50 "$OUT/snakemake.log"; exit 1; }
fi
WORKDIR="$(cd "$WORKDIR" && pwd)"
# the config's study (editscale.layout.study_name: the config file's name, config.yaml: default)
STUDY="$(basename "${CONFIG:-config.yaml}" .yaml)"; [ "$STUDY" = config ] && STUDY=default
REPORT="$WORKDIR/results/studies/$STUDY/report.html"
FIGURE="$WORKDIR/results/studies/$STUDY/plots/edit_scores.html"
PAGE="$WORKDIR/results/studies/$STUDY/plots/figures.html"
[ -f "$FIGURE" ] || { echo "error: $FIGURE not found: run the workflow first" >&2; exit 1; }
if [ ! -f "$REPORT" ]; then
  command -v snakemake >/dev/null || export PATH="$REPO/.venv/bin:$PATH"
  echo "== snakemake --report results/studies/$STUDY/report.html (${CONFIG:-config.yaml})"
  (cd "$WORKDIR" && snakemake --cores 1 --report "results/studies/$STUDY/report.html" --configfile "${CONFIG:-config.yaml}" >"$OUT/report.log" 2>&1) \
    || { tail -30 "$OUT/report.log"; exit 1; }
fi

# A copy of the report that opens the interactive figures page in the report's own viewer
# (the report is a React app that keeps its root component in the global `app`).
VIEW="$OUT/report-figures.view.html"
"$PY" - "$REPORT" "$VIEW" "results/studies/$STUDY/plots/figures.html" <<'EOF'
import sys
src, dst, path = sys.argv[1:]
html = open(src, encoding="utf-8").read()
if f'"{path}"' not in html:
    sys.exit(f"{src} does not contain {path}")
script = """<script>
(function show(tries) {
  if (typeof app === "undefined" || !app) { if (tries > 0) setTimeout(function () { show(tries - 1); }, 100); return; }
  app.showCategory("Figures (interactive)");
  app.setView({content: "html", contentPath: results["%s"].data_uri, resultPath: "%s"});
})(100);
</script>
""" % (path, path)
i = html.rindex("</body>")
open(dst, "w", encoding="utf-8").write(html[:i] + script + html[i:])
EOF

FLAGS=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
  --disable-component-update --disable-sync --window-size=1400,1000 --virtual-time-budget=15000 --hide-scrollbars)
chromium() {  # a fresh profile each time; stderr (dbus noise) to chromium.log
  local profile
  profile="$(mktemp -d)"
  timeout 180 "$CHROMIUM" "${FLAGS[@]}" --user-data-dir="$profile" "$@" 2>>"$OUT/chromium.log"
  rm -rf "$profile"
}
shot() {  # shot NAME FILE: NAME.png (screenshot) and NAME.dom.html (the rendered DOM)
  local name="$1" url="file://$2"
  chromium --screenshot="$OUT/$name.png" "$url" >>"$OUT/chromium.log"
  chromium --dump-dom "$url" >"$OUT/$name.dom.html"
  echo "   $name.png  <- $url"
}
echo "== screenshots into $OUT"
shot report-home "$REPORT"
shot report-figures "$VIEW"
shot figures "$PAGE"
shot edit_scores "$FIGURE"

echo "== checks"
"$PY" - "$OUT" "$WORKDIR/results/studies/$STUDY/plots" <<'EOF'
"""Decode the PNGs (stdlib zlib) and check they show a rendered chart."""
import re
import struct
import sys
import zlib
from pathlib import Path

out, plots = Path(sys.argv[1]), Path(sys.argv[2])


def decode_png(path):
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise SystemExit(f"{path}: not a PNG")
    pos, idat, w = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or ctype not in (2, 6) or interlace:
                raise SystemExit(f"{path}: unsupported PNG (depth {depth}, colour type {ctype}, interlace {interlace})")
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, [[tuple(r[x * bpp:x * bpp + 3]) for x in range(w)] for r in rows]


def near(px, ref, tol=12):
    return all(abs(p - q) <= tol for p, q in zip(px, ref))


VEGA_BLUE = (76, 120, 168)  # #4c78a8: ROME's colour in every figure (editscale.report.plots.method_colors)
failures = []


def look(png, x0=0):
    """(width, height, kB, distinct colours, non-background share, #4c78a8 pixels) from x0 on."""
    kb = png.stat().st_size / 1024
    w, h, px = decode_png(png)
    region = [p for row in px for p in row[x0:]]
    bg = max(set(region[::97]), key=region[::97].count)
    return w, h, kb, len(set(region)), sum(p != bg for p in region) / len(region), sum(near(p, VEGA_BLUE) for p in region)


# the screenshots: the report's landing page shows the phases of every run (the study overview
# image in its description), the report's interactive figures, the figures page alone (it opens on
# the study overview), one figure's own page (vega from the folder's bundle)
for name, x0, min_kb, min_line in (("report-home", 0, 20, 30), ("report-figures", 280, 20, 100), ("figures", 0, 20, 100), ("edit_scores", 0, 10, 100)):
    w, h, kb, colours, ink, blue = look(out / f"{name}.png", x0)
    print(f"   {name}.png: {w}x{h}, {kb:.0f} kB, {colours} distinct colours from x={x0}, "
          f"{100 * ink:.1f}% non-background, {blue} chart-line (#4c78a8) pixels")
    if kb < min_kb:
        failures.append(f"{name}.png is only {kb:.1f} kB")
    if colours < 50 or ink < 0.005:
        failures.append(f"{name}.png looks blank ({colours} colours, {100 * ink:.2f}% non-background)")
    if blue < min_line:
        failures.append(f"{name}.png shows no chart line (only {blue} pixels of #4c78a8)")
# every figure's PNG as a reader gets it: decodes, shows a chart, stays under 1 MB
for png in sorted(plots.glob("*.png")):
    w, h, kb, colours, ink, blue = look(png)
    print(f"   plots/{png.name}: {w}x{h}, {kb:.0f} kB, {colours} colours, {100 * ink:.1f}% non-background")
    if colours < 20 or ink < 0.01 or kb > 1024:
        failures.append(f"plots/{png.name}: {colours} colours, {100 * ink:.2f}% non-background, {kb:.0f} kB")


def rendered(name):
    """The DOM Chromium rendered, without <script>/<style> bodies (they name everything)."""
    dom = (out / f"{name}.dom.html").read_text(errors="replace")
    return re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)


home = rendered("report-home")
for label in ("Workflow", "Statistics", "Phases", "Figures", "Figures (interactive)", "Tables"):
    if f">{label}<" not in home:
        failures.append(f"report-home: the rendered menu lacks {label!r} (did the report's JavaScript run?)")
glance = home[home.find('class="editscale-glance"'):]
if "Phases of every run at a glance" not in home or "<svg" not in glance[:500] or "Phases of every run" not in glance:
    failures.append("report-home: the landing page does not show the phases of every run (the study overview's SVG)")
page = rendered("figures")
n_figures = len(re.findall(r'<h2 id="fig-', page))
n_charts = len(re.findall(r'<svg[^>]*class="marks"', page))
print(f"   figures.html: {n_figures} figures, {n_charts} rendered vega charts")
if n_figures < 6 or n_charts != n_figures:
    failures.append(f"figures.html: {n_charts} of {n_figures} figures rendered")
for title in ("Phases of every run", "Editing proficiency", "Forgetting of earlier edits", "Downstream ability"):
    if title not in page:
        failures.append(f"figures.html: no rendered chart title {title!r}")
if page.find("Phases of every run") > page.find("Editing proficiency"):
    failures.append("figures.html does not open on the phases of every run")
fig = rendered("edit_scores")
if 'class="marks"' not in fig and "<canvas" not in fig:
    failures.append('edit_scores.html: vega rendered no <svg class="marks"> or <canvas>')
if "Editing proficiency" not in fig:
    failures.append("edit_scores.html: no rendered chart title 'Editing proficiency'")
if failures:
    print("FAILED:\n  " + "\n  ".join(failures))
    sys.exit(1)
print("   all checks passed")
EOF
# the DOM dumps and the report copy are large (the report inlines every figure): keep the PNGs
[ -n "${KEEP_DOM:-}" ] || rm -f "$OUT"/*.dom.html "$VIEW"
echo "== screenshots: $OUT/report-home.png $OUT/report-figures.png $OUT/figures.png $OUT/edit_scores.png"
