"""The registry of editing methods and the interface every method implements.

A method is a class derived from `EditMethod`, registered in `METHODS` by dotted path (imported
lazily, so the registry works before every method's module exists). The edit chain creates one
method object per segment, calls `apply` once per batch of cases (batch size 1 for sequential
single edits), and saves `state_dict()` with the segment.

Methods never write model parameters: they read the current fp32 (out, in) matrix with
`weights.current(module)` and change it only through `weights.apply(Update(...))`, so every update
is recorded as factors and can be replayed exactly.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..io import EditscaleError
from ..models.registry import mlp_out_name, n_layers
from . import hparams as hparams_spec
from .weights import WeightState

# name -> (class dotted path, one-line description): the built-in methods. Plugins add theirs with
# `register_method` (a `plugins:` module of the config) or an `editscale.methods` entry point.
METHODS: dict[str, tuple[str, str]] = {
    "rome": ("editscale.edit.rome.Rome", "ROME (Meng et al. 2022): rank-one update of one MLP output matrix, C^-1 k* direction, key at the plain prompt"),
    "r-rome": ("editscale.edit.rome.RRome", "r-ROME (Gupta et al. 2024): ROME with the template-averaged key k* used in both places of the update"),
    "memit": ("editscale.edit.memit.Memit", "MEMIT (Meng et al. 2023): least-squares batch update spread over several MLP layers"),
    "emmet": ("editscale.edit.emmet.Emmet", "EMMET (Gupta et al. 2024): equality-constrained batch edit of one layer (B=1 equals r-ROME)"),
    "alphaedit": ("editscale.edit.alphaedit.AlphaEdit", "AlphaEdit (Fang et al. 2025): MEMIT with the update projected on the null space of preserved keys"),
    "encore": ("editscale.edit.encore.Encore", "ENCORE (Gupta et al. 2025): MEMIT + norm penalty + earlier edits' keys, with most-probable early stopping"),
    "nas": ("editscale.edit.nas.Nas", "NAS (2026): AlphaEdit with each target value v* scaled to the unedited model's mean ||v*||, edits above 2x skipped"),
    "rect": ("editscale.edit.rect.Rect", "RECT (Gu et al. 2024): MEMIT with each update kept only at its top 40 % relative changes |dW / W|"),
    "prune": ("editscale.edit.prune.Prune", "PRUNE (Ma et al. 2025): ROME / MEMIT / AlphaEdit (base:) with the accumulated delta's singular values above sigma_max(W0) log-restrained"),
    "ultraedit": ("editscale.edit.ultraedit.UltraEdit", "UltraEdit (Gu et al. 2025): one gradient pass per edit, lifelong-normalized [key | gradient], closed-form ridge update"),
    "ft-c": ("editscale.edit.ftc.FineTuneConstrained", "FT-C: constrained (L-inf bounded) fine-tuning of one MLP layer on the target"),
}
ENTRY_POINT_GROUP = "editscale.methods"


def register_method(name: str, cls_or_path, description: str = "") -> None:
    """Add a method to the registry (a plugin's module calls this at import); the class or its
    dotted path. A name already taken is an error, so that a plugin cannot silently replace one."""
    path = cls_or_path if isinstance(cls_or_path, str) else f"{cls_or_path.__module__}.{cls_or_path.__qualname__}"
    if name in METHODS and METHODS[name][0] != path:
        raise EditscaleError(f"editing method {name!r} is already registered ({METHODS[name][0]}); {path} cannot take the name")
    if not isinstance(cls_or_path, str):
        _CLASSES[name] = cls_or_path
        doc = (cls_or_path.__doc__ or "").strip()
        description = description or (doc.splitlines()[0] if doc else name)
    METHODS[name] = (path, description)


_CLASSES: dict[str, type] = {}


class EditMethod:
    """Base class of an editing method.

    Class attributes:
        name: registry name.
        hparams_type: dataclass of the method's hyper-parameters (`editscale.edit.hparams`): every
            key a file may hold, its type, default, allowed values; `required_hparams` and
            `default_hparams` are derived from it.
        forced_hparams: values the method sets whatever the file says (keys not in hparams_type).
        update_kind: "lowrank" (factors u v^T), "dense" (a full matrix per update) or "masked"
            (float64 factors and a mask: RECT).
        batch_edits: whether `apply` computes one joint update for a batch of cases (MEMIT
            family, FT-C, UltraEdit); False (ROME family) makes edits_per_step > 1 an error.
        wraps: for a wrapper (PRUNE), the hparams key naming the method it wraps (`variant`
            returns the combined class); "" for a method that edits by itself.
        solve_cost: how doctor estimates the closed-form part of one edit: "per_segment" (one
            factorization of C per segment, a triangular solve per edit: ROME family),
            "per_edit" (a d x d solve per edit: MEMIT family), "gradient" (one forward / backward
            pass and a d x d solve per edit, no value optimization: UltraEdit) or "none"
            (fine-tuning).
        precomputed(hparams): what the stats stage must provide for the edit jobs (see there).
        template_rule: how the reference samples and averages context templates ("rome": one flat
            group from the document-start token; "memit": [["{}"], samples after five openers],
            keys averaged per group); see `editscale.edit.common.sample_context_templates`.
        value_loss_layer: where the reference reads the value-optimization loss ("final": ROME's
            final logits; "max": MEMIT's layer max(v_loss_layer, injection layer)).
        easyedit_name: EasyEdit's `alg_name` of the same method ("" = none; not inherited), for
            `editscale hparams import-easyedit` (`editscale.edit.easyedit`);
            easyedit_keys: EasyEdit key -> editscale key where the names differ.

    Construction (once per segment):
        model, tok: the loaded model (eval mode, parameters requires_grad False) and its tokenizer
            (pad token set, right padding).
        hparams: the method's hyper-parameters (see `load_hparams`).
        stats: module name -> second moment E[k k^T] of that module's inputs (float64 [d_in, d_in]),
            for each module of `modules(model, hparams)` the method needs statistics for.
        context_templates: groups of templates from `sample_context_templates` (a flat list of
            strings is one group): [["{}", "<prefix>. {}", ...]] or [["{}"], ["<prefix>. {}", ...]].
        state: what `state_dict()` returned at the end of the previous segment (None at the start).
    """

    name: str = ""
    hparams_type: type = dataclasses.make_dataclass("NoHparams", [])
    forced_hparams: dict = {}
    required_hparams: tuple[str, ...] = ()
    default_hparams: dict = {}
    template_rule: str = "memit"
    value_loss_layer: str = "max"
    update_kind: str = "lowrank"
    solve_cost: str = "per_edit"
    batch_edits: bool = True
    wraps: str = ""
    easyedit_name: str = ""
    easyedit_keys: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "easyedit_name" not in cls.__dict__:  # a subclass is another method unless it says so
            cls.easyedit_name = ""
        cls.required_hparams = hparams_spec.required(cls.hparams_type)
        cls.default_hparams = hparams_spec.defaults(cls.hparams_type)

    def __init__(self, model, tok, hparams: dict, stats: dict[str, torch.Tensor], context_templates: list[str], state: dict | None = None):
        self.model = model
        self.tok = tok
        hp = {**self.default_hparams, **{k: v for k, v in hparams.items() if k not in self.forced_hparams}}
        self.validate_hparams(hp, source=f"{self.name} hparams")
        self.check_for_model(hp, n_layers(model), source=f"{self.name} hparams")
        self.hparams = {**hp, **self.forced_hparams}
        self.stats = stats or {}
        from .common import template_groups

        if not context_templates:
            raise EditscaleError(f"{self.name}: no context templates (expected at least ['{{}}'])")
        self.context_templates = template_groups(context_templates)

    @classmethod
    def variant(cls, hparams: dict) -> type:
        """The class that edits with `hparams`: `cls` itself, except for a wrapper whose hparams
        name the method it wraps (PRUNE's `base:`), which returns the combined class."""
        return cls

    @classmethod
    def extra_solve_flops(cls, hparams: dict, shapes: dict[str, tuple[int, int]]) -> float:
        """Float64 FLOPs per edit beyond `solve_cost`'s (doctor; PRUNE's SVDs). 0 by default."""
        return 0.0

    @classmethod
    def factor_rank(cls, hparams: dict, target_tokens: float) -> float:
        """Rank of one edit's stored factors per edited module (doctor's bytes/edit): 1 for the
        rank-one methods; a method that writes one rank per target token returns `target_tokens`
        (the doctor's mean target length in tokens)."""
        return 1.0

    @classmethod
    def begin_flops(cls, hparams: dict, flops_per_prompt_step: float) -> float:
        """Model FLOPs of `begin` (once per chain, counted in its first segment's job, e.g. an
        anchor computed before the first edit), given the FLOPs of one optimization step over one
        edit prompt. 0 by default."""
        return 0.0

    @classmethod
    def device_matrices(cls, hparams: dict) -> tuple[float, float]:
        """(resident, transient): how many float64 [d_in, d_in] matrices the edit job holds per
        edited module for the whole segment (second moments, projections, factors kept), and at
        most at once while one module's update is solved (doctor's memory estimate). Derived from
        `precomputed` and `solve_cost`; a method holding more says so."""
        needs = cls.precomputed(hparams)
        resident = float("mom2" in needs) + float("nullspace" in needs)
        if cls.solve_cost == "per_segment" and "mom2" in needs:
            resident += 1  # the Cholesky factor of C, kept for the segment
        transient = {"per_edit": 3.0, "gradient": 2.0}.get(cls.solve_cost, 0.0)  # the system, its factor, a sum
        return resident, transient

    @classmethod
    def value_prompts(cls, hparams: dict) -> tuple[int, float]:
        """(prompts, tokens per prompt) of one edit's optimization pass, whose activations are kept
        for the backward pass (doctor's memory estimate): the rewriting prompts of the context
        templates (template length + ~12 tokens of prompt and target) for a value optimization;
        a method without one overrides it."""
        params = hparams.get("context_template_length_params", [[5, 10], [10, 10]])
        n = sum(int(c) for _, c in params)
        mean_len = sum(int(length) * int(c) for length, c in params) / max(n, 1)
        return 1 + n, mean_len + 12

    @classmethod
    def precomputed(cls, hparams: dict) -> dict[str, dict]:
        """Inputs the workflow computes before the edit jobs, by kind: "mom2" (the second moment
        of each edited module's input, passed as `stats`) and/or "nullspace" ({"threshold": t}:
        the projection of each edited module, passed as `projections`). {} when none."""
        return {"mom2": {}}

    @staticmethod
    def modules(model, hparams) -> list[str]:
        """Names of the edited modules (also the modules whose input statistics the method needs).
        `model` is a loaded model or its architecture name (model_type): the workflow plans with
        the name, before any weights are read, so only the registry's names may be used here."""
        return [mlp_out_name(model, int(layer)) for layer in hparams["layers"]]

    @classmethod
    def validate_hparams(cls, hp: dict, source: str = "hparams") -> None:
        """Raise EditscaleError naming `source` and the key when a key is unknown or missing or a
        value unusable (`hparams_type`); subclasses add their cross-field rules."""
        hparams_spec.check(cls.hparams_type, hp, source, cls.name)

    @classmethod
    def validate_hparams_partial(cls, hp: dict, source: str) -> None:
        """Keys, types and allowed values of a partial dict (`hparams_overrides`), no missing-key check."""
        hparams_spec.check(cls.hparams_type, {k: v for k, v in hp.items() if k not in cls.forced_hparams}, source, cls.name, partial=True)
        forced = sorted(set(hp) & set(cls.forced_hparams))
        if forced:
            raise EditscaleError(f"{source}: {forced} cannot be set for method {cls.name!r}, which always uses {cls.forced_hparams}")

    @classmethod
    def check_for_model(cls, hp: dict, layers_in_model: int, source: str = "hparams") -> None:
        """Checks that need the model's layer count (known from config.json before any job runs)."""
        hparams_spec.check_layers(hp, layers_in_model, source)

    def begin(self, sequence: list[dict]) -> None:
        """Called once per chain, on the unedited model before its first edit, with the run's
        whole edit sequence (NAS measures its anchor norm here); its result belongs in
        `state_dict()`. Nothing by default."""

    def apply(self, cases: list[dict], weights: WeightState) -> list[dict]:
        """Edit the model so that every case's prompt predicts its target_new; one log row per case
        (at least case_id and v_loss)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, np.ndarray]:
        """Method state saved with each segment and passed back as `state`; {} when stateless."""
        return {}


_PLUGINS_LOADED: set[str] = set()
_ENTRY_POINTS_LOADED = False


def load_plugins(modules=()) -> None:
    """Import plugin modules (the config's `plugins:`, and EDITSCALE_PLUGINS, which the Snakefile
    sets so that every job sees the same plugins) and the `editscale.methods` / `editscale.metrics`
    entry points of installed packages; their import registers what they define. Each module and
    the entry points are loaded once per process; a module that registers nothing is an error
    (a plugin whose registration is missing would otherwise be ignored)."""
    import os
    import sys
    from importlib.metadata import entry_points

    from ..evaluate.registry import METRICS, Metric, register_metric

    global _ENTRY_POINTS_LOADED
    names = [*modules, *filter(None, os.environ.get("EDITSCALE_PLUGINS", "").split(","))]
    for module_name in dict.fromkeys(names):
        if module_name in _PLUGINS_LOADED:
            continue
        fresh = module_name not in sys.modules
        before = (set(METHODS), set(METRICS))
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            raise EditscaleError(f"plugin module {module_name!r} cannot be imported ({exc}); is it on PYTHONPATH?") from exc
        if fresh and (set(METHODS), set(METRICS)) == before:
            raise EditscaleError(f"plugin module {module_name!r} registered no method or metric "
                                 "(it must call editscale.edit.methods.register_method or editscale.evaluate.registry.register_metric)")
        _PLUGINS_LOADED.add(module_name)
    if not _ENTRY_POINTS_LOADED:
        for group in (ENTRY_POINT_GROUP, "editscale.metrics"):
            for ep in entry_points(group=group):
                obj = ep.load()
                if group == ENTRY_POINT_GROUP and isinstance(obj, type) and ep.name not in METHODS:
                    register_method(ep.name, obj)
                elif isinstance(obj, Metric):
                    register_metric(obj)
        _ENTRY_POINTS_LOADED = True


def get_method(name: str, hparams: dict | None = None) -> type[EditMethod]:
    """The class registered under `name` (imported on demand); with `hparams`, the class that
    edits with them (`EditMethod.variant`: a wrapper combined with the method it wraps)."""
    cls = _registered_class(name)
    return cls.variant(hparams) if hparams is not None else cls


def _registered_class(name: str) -> type[EditMethod]:
    if name not in METHODS:
        raise EditscaleError(f"unknown editing method {name!r}; available: {sorted(METHODS)}")
    if name in _CLASSES:
        return _CLASSES[name]
    path = METHODS[name][0]
    module_name, _, cls_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise EditscaleError(f"method {name!r} is registered as {path} but {module_name} is not available in this installation") from exc
        raise
    try:
        return getattr(module, cls_name)
    except AttributeError as exc:
        raise EditscaleError(f"method {name!r}: {module_name} has no class {cls_name}") from exc


def describe_methods() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered method, for `editscale methods`."""
    return [(name, desc) for name, (_, desc) in METHODS.items()]


def load_hparams(path, method: str | None = None, required: Iterable[str] | None = None) -> dict:
    """Read a YAML hyper-parameter file and validate it.

    Required keys come from `required`, else from the method class (`required_hparams`, defaults
    `default_hparams`, value checks `validate_hparams`) named by `method`, by a `method:` key in the
    file, or by the file's directory (config/hparams/<method>/<model>.yaml). A missing key raises
    EditscaleError naming the key and the file. Returns defaults updated with the file's values.
    """
    path = Path(path)
    data = hparams_spec.read_file(path)
    cls = None
    name = method or data.get("method") or (path.parent.name if path.parent.name in METHODS else None)
    if name is not None:
        cls = get_method(name, data)
    req = list(required) if required is not None else list(getattr(cls, "required_hparams", ()))
    missing = [k for k in req if k not in data]
    if missing:
        raise EditscaleError(f"hyper-parameter file {path} is missing required key(s) {missing}" + (f" for method {name!r}" if name else ""))
    hp = {**getattr(cls, "default_hparams", {}), **data}
    hp.pop("method", None)
    if cls is not None and hasattr(cls, "validate_hparams"):
        cls.validate_hparams(hp, source=str(path))
    return hp
