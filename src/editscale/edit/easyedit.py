"""EasyEdit (zjunlp/EasyEdit) hyper-parameter files -> editscale hparams files.

EasyEdit's ROME-lineage files (ROME, R-ROME, MEMIT, EMMET, AlphaEdit) use the reference code's
names for what the method computes (layers, v_lr, kl_factor, mom2_update_weight, ...), which are
editscale's names too, and add keys that say where and how EasyEdit runs (model_name, device,
stats_dir, fp16, ...) and module-name templates. The conversion:

* the method: the registered method whose entry's `easyedit` is the file's `alg_name` (or --method);
* module templates (`rewrite_module_tmp`, `layer_module_tmp`, `mlp_module_tmp`, `ln_f_module`,
  `lm_head_module`; UltraEdit's `inner_params`) are matched against the architecture registry
  (`editscale.models.registry.ARCHITECTURES`): they must name the modules editscale edits and
  reads for one family; editscale files do not carry them (the model's family decides);
* run-time keys are dropped, each with the config key that takes its place;
* the entry's `easyedit_keys` renames keys; its `easyedit_notes` name the EasyEdit keys that change
  nothing editscale's method computes (dropped with the reason, or an error for a value that would
  make EasyEdit compute something else); any other key the method does not have is dropped and
  named ("cannot map");
* the result is validated like any hparams file (`validate_hparams`; with a model directory also
  the layer range), and the keys left at editscale's defaults are listed.

Every problem of a file is reported in one error; every dropped key is printed with its value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..io import EditscaleError
from . import hparams as hparams_spec
from .methods import METHODS, get_method

# EasyEdit keys that configure its runner, not the method: key -> where editscale sets it
RUNTIME_KEYS = {
    "alg_name": "the method: the run's `method:` (and the hparams file's directory)",
    "model_name": "the model: config `models:` (source)",
    "model_class": "the model: config `models:`",
    "tokenizer_name": "the model: config `models:` (the tokenizer comes with it)",
    "tokenizer_class": "the model: config `models:`",
    "device": "`--device` / resources.gpu",
    "stats_dir": "second moments are stage outputs: results/stats/{model}/{corpus}/",
    "mom2_dataset": "the corpus: config `corpora:` and the run's `corpus:`",
    "mom2_n_samples": "config `corpora.<c>.n_tokens` (editscale counts tokens, EasyEdit samples)",
    "mom2_dtype": "second moments are accumulated and solved in float64",
    "model_parallel": "one device per job",
    "fp16": "config `models.<m>.dtype`",
    "half": "config `models.<m>.dtype`",
    "P_loc": "the null-space projection is a stats-stage output (results/stats/.../nullspace)",
    "results_dir": "results/ (the workflow's layout)",
    "silent": "logging: `editscale -v`",
    "max_length": "prompts are truncated to the model's context",
    "editor_batch_size": "the run's `edits_per_step`",
    "batch_size_once": "the run's `edits_per_step`",
    "dropout": "models are edited in eval mode",
    "no_grad_layers": "only the hparams' layers are edited",
    "class_name": "the model: config `models:` (EasyEdit reads it as model_class)",
}
# module-name prefixes of families editscale cannot load -> why (the import's error says it)
UNSUPPORTED_FAMILIES = {
    "transformer.encoder.layers.": "ChatGLM / GLM-4 in their remote-code form (trust_remote_code), which editscale does not load",
    "language_model.": "a multimodal model's text tower (e.g. Gemma3ForConditionalGeneration); editscale edits text-only causal LMs",
}
# module-name templates -> the ArchSpec field they must equal ("" = not used by editscale)
MODULE_KEYS = {
    "rewrite_module_tmp": "mlp_out",
    "layer_module_tmp": "layer",
    "ln_f_module": "final_norm",
    "lm_head_module": "lm_head",
    "mlp_module_tmp": "mlp",
    "attn_module_tmp": "",
}


@dataclass
class Conversion:
    method: str
    source: str
    alg_name: str
    architecture: str
    hparams: dict
    values: dict = field(default_factory=dict)  # the file's keys and values, as read
    dropped: dict[str, str] = field(default_factory=dict)  # EasyEdit key -> why
    renamed: dict[str, str] = field(default_factory=dict)  # EasyEdit key -> editscale key
    defaults: dict = field(default_factory=dict)  # editscale keys the file leaves at their default

    def report(self) -> str:
        lines = [f"{self.source}: EasyEdit {self.alg_name} -> editscale {self.method}, architecture {self.architecture}"]
        lines += [f"  renamed {k} -> {v}" for k, v in self.renamed.items()]
        lines += [f"  dropped {k} ({self.values.get(k)!r}): {why}" for k, why in self.dropped.items()]
        if self.defaults:
            lines.append("  editscale defaults apply: " + ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()))
        return "\n".join(lines)

    def yaml(self) -> str:
        import yaml

        head = [f"# Imported from EasyEdit {self.alg_name} hparams {self.source} by `editscale hparams import-easyedit`;",
                f"# module templates matched architecture {self.architecture}."]
        head += [f"# dropped {k} ({self.values.get(k)!r}): {why}" for k, why in self.dropped.items()]
        if self.defaults:
            head.append("# editscale defaults apply: " + ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()))
        return "\n".join(head) + "\n" + yaml.safe_dump(self.hparams, sort_keys=False, default_flow_style=None)


def method_for(alg_name: str) -> str:
    """The registered method whose EasyEdit name (its registry entry's `easyedit`) is `alg_name`
    (case-insensitive)."""
    known = {entry.easyedit.lower(): name for name, entry in METHODS.items() if entry.easyedit}
    if alg_name.lower() not in known:
        raise EditscaleError(f"EasyEdit alg_name {alg_name!r} has no editscale counterpart; importable: "
                             f"{sorted(METHODS[n].easyedit for n in known.values())} (or pass --method)")
    return known[alg_name.lower()]


def _spec_value(spec, field_name: str) -> str:
    return spec.layer + ".mlp" if field_name == "mlp" else getattr(spec, field_name)


def match_architecture(data: dict) -> tuple[str, list[str], list[str]]:
    """(family names, template keys checked, problems) for the file's module templates: a template
    naming a module other than the registry's family is a problem naming the key."""
    from ..models.registry import ARCHITECTURES

    templates = {k: data[k] for k in MODULE_KEYS if k in data}
    inner = data.get("inner_params") or []
    if "rewrite_module_tmp" not in templates and not inner:
        return "any (the file names no modules)", [], []
    families = []
    for arch, spec in ARCHITECTURES.items():
        if "rewrite_module_tmp" in templates and templates["rewrite_module_tmp"] != spec.mlp_out:
            continue
        if inner and not all(_module_kind(spec, m) for m in inner):
            continue
        families.append(arch)
    if not families:
        shown = inner[:2] + ([f"... {len(inner) - 2} more"] if len(inner) > 2 else [])
        what = f"rewrite_module_tmp {templates['rewrite_module_tmp']!r}" if "rewrite_module_tmp" in templates else f"inner_params {shown}"
        named = str(templates.get("rewrite_module_tmp") or inner[0])
        why = next((why for prefix, why in UNSUPPORTED_FAMILIES.items() if named.startswith(prefix)), "")
        return "", list(templates), [f"{what} names no edited module of editscale's architecture registry"
                                     + (f": {why}" if why else f" ({', '.join(f'{a}: {s.mlp_out}' for a, s in ARCHITECTURES.items())}); "
                                        "add the family to editscale.models.registry")]
    spec = ARCHITECTURES[families[0]]
    problems = []
    for key, value in templates.items():
        target = MODULE_KEYS[key]
        if not target:
            continue
        expected = {_spec_value(spec, target)} | ({spec.embed} if key == "lm_head_module" else set())  # tied LM head
        if value not in expected:
            problems.append(f"{key} {value!r} is not {families[0]}'s {' or '.join(sorted(expected))} (editscale reads the modules of "
                            "the architecture registry)")
    return "/".join(families), list(templates), problems


def _module_kind(spec, module: str) -> tuple[str, int] | None:
    """("layers" | "mlp_in_layers" | "mlp_up_layers", layer) when `module` is one of the family's MLP matrices."""
    for key, template in (("layers", spec.mlp_out), ("mlp_in_layers", spec.mlp_in), ("mlp_up_layers", spec.mlp_up)):
        if template:
            m = re.fullmatch(re.escape(template).replace(r"\{\}", r"(\d+)"), module)
            if m:
                return key, int(m.group(1))
    return None


_SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _number(value):
    """EasyEdit writes 5e-1 and 1e-6, which YAML 1.1 (PyYAML) reads as text; EasyEdit's loader
    casts them, so does the import."""
    return float(value) if isinstance(value, str) and _SCIENTIFIC.fullmatch(value) else value


def convert(path: str | Path, method: str | None = None, n_layers: int | None = None) -> Conversion:
    """The editscale hparams of one EasyEdit file (see the module docstring); one error listing
    every problem of the file."""
    path = Path(path)
    data = hparams_spec.read_file(path)
    alg_name = str(data.get("alg_name", ""))
    if method is None:
        if not alg_name:
            raise EditscaleError(f"{path}: no alg_name; pass --method")
        method = method_for(alg_name)
    cls = get_method(method)
    architecture, checked, problems = match_architecture(data)
    fields = hparams_spec.fields(cls.hparams_type)
    renames = dict(METHODS[method].easyedit_keys)
    notes = dict(METHODS[method].easyedit_notes)
    out: dict = {}
    conv = Conversion(method, str(path), alg_name or method, architecture or "unknown", out, values=dict(data))
    if data.get("inner_params") and architecture:
        from ..models.registry import ARCHITECTURES

        spec = ARCHITECTURES[architecture.split("/")[0]]
        for module in data["inner_params"]:
            key, layer = _module_kind(spec, module)
            if key not in fields:
                problems.append(f"inner_params {module!r} is a {key} matrix, which editscale's {method} does not edit")
                continue
            out.setdefault(key, []).append(layer)
        conv.renamed["inner_params"] = "/".join(sorted({k for k in out}))
    for key, value in data.items():
        if key in checked or key == "inner_params":
            continue
        if key in RUNTIME_KEYS:
            conv.dropped[key] = RUNTIME_KEYS[key]
        elif key in notes:
            accepted, why = notes[key]
            if accepted is None or value in accepted:
                conv.dropped[key] = why
            else:
                problems.append(f"{key} = {value!r}: {why}")
        elif key in renames:
            out[renames[key]] = _number(value)
            conv.renamed[key] = renames[key]
        elif key in fields:
            out[key] = _number(value)
        else:
            conv.dropped[key] = f"cannot map: editscale's {method} has no hyper-parameter {key!r}"
    for key in checked:
        if not MODULE_KEYS[key]:
            conv.dropped[key] = "editscale edits no attention module"
    conv.defaults = {k: v for k, v in cls.default_hparams.items() if k not in out}
    for check in (lambda hp: cls.validate_hparams(hp, source="hparams"),
                  lambda hp: n_layers is None or cls.check_for_model(hp, n_layers, source="hparams")):
        try:
            check({**cls.default_hparams, **out})
        except EditscaleError as exc:
            problems += [p.removeprefix("hparams: ") for p in getattr(exc, "problems", None) or [str(exc)]]
    if problems:
        raise EditscaleError(f"{path}: cannot import it as editscale's {method} ({len(problems)} problem{'s' * (len(problems) > 1)}):\n"
                             + "\n".join(f"  - {p}" for p in problems))
    return conv
