"""The registry of editing methods and the interface every method implements.

A method is a class derived from `EditMethod`, registered in `METHODS` (an editscale.registry.Registry)
by a `module:Class` reference (imported lazily, so the registry works before every method's
module exists). The edit chain creates one
method object per segment, calls `apply` once per batch of cases (batch size 1 for sequential
single edits), and saves `state_dict()` with the segment.

Methods never write model parameters: they read the current fp32 (out, in) matrix with
`weights.current(module)` and change it only through `weights.apply(Update(...))`, so every update
is recorded as factors and can be replayed exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..io import EditscaleError
from ..registry import Registry, resolve
from ..models.registry import get_module, mlp_out_name, n_layers
from . import hparams as hparams_spec
from .memory import new_memory
from .weights import WeightState

@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """A registered method: its class as a `module:Class` reference (imported on first use) and
    a one-line description (`editscale methods`)."""

    ref: str
    description: str
    cls: type | None = dataclasses.field(default=None, compare=False)  # a class handed over directly
    # interop (`editscale hparams import-easyedit`, editscale.edit.easyedit): EasyEdit's `alg_name`
    # of the same method ("" = none), and EasyEdit key -> editscale key where the names differ
    easyedit: str = ""
    easyedit_keys: tuple[tuple[str, str], ...] = ()
    # EasyEdit keys editscale's method has no counterpart for because they change nothing it
    # computes: key -> (the values that keep EasyEdit computing what editscale does, None = any; why).
    # Another value is an import error naming the key.
    easyedit_notes: tuple[tuple[str, tuple[tuple | None, str]], ...] = ()
    # planning: what `editscale doctor` estimates its jobs by, a `module:Class` reference to a
    # subclass of editscale.edit.cost.CostSpec ("" = CostSpec itself)
    cost: str = ""

    def load(self) -> type:
        return self.cls if self.cls is not None else resolve(self.ref, what="method class")


def _method_from_entry_point(name: str, obj) -> MethodEntry | None:
    return _entry(obj, "") if isinstance(obj, type) else None


def _entry(cls_or_ref, description: str, easyedit: str = "", easyedit_keys: dict | None = None, cost: str = "",
           easyedit_notes: dict | None = None) -> MethodEntry:
    interop = {"easyedit": easyedit, "easyedit_keys": tuple(sorted((easyedit_keys or {}).items())), "cost": cost,
               "easyedit_notes": tuple(sorted((easyedit_notes or {}).items()))}
    if isinstance(cls_or_ref, str):
        module, sep, attr = cls_or_ref.rpartition(":") if ":" in cls_or_ref else cls_or_ref.rpartition(".")  # a dotted path too
        return MethodEntry(f"{module}:{attr}" if sep else cls_or_ref, description, **interop)
    doc = (cls_or_ref.__doc__ or "").strip()
    return MethodEntry(f"{cls_or_ref.__module__}:{cls_or_ref.__qualname__}", description or (doc.splitlines()[0] if doc else ""), cls_or_ref,
                       **interop)


# The editing methods: name -> MethodEntry. Plugins add theirs with `register_method` (a `plugins:`
# module of the config) or an `editscale.methods` entry point (a class).
METHODS: Registry[MethodEntry] = Registry("editing method", refs=lambda e: ([] if e.cls is not None else [e.ref]) + ([e.cost] if e.cost else []),
                                          entry_points="editscale.methods", from_entry_point=_method_from_entry_point)


def register_method(name: str, cls_or_ref, description: str = "", easyedit: str = "", easyedit_keys: dict | None = None,
                    cost: str = "", easyedit_notes: dict | None = None) -> None:
    """Add a method to the registry (a plugin's module calls this at import): its class, or a
    `module:Class` reference; (for `editscale hparams import-easyedit`) EasyEdit's alg_name of it,
    the keys EasyEdit names differently and the EasyEdit keys that change nothing editscale's
    method computes (MethodEntry.easyedit_notes); (for `editscale doctor`) its cost spec, a
    `module:Class` reference to an editscale.edit.cost.CostSpec subclass. A name already taken is
    an error, so that a plugin cannot silently replace one."""
    METHODS.add(name, _entry(cls_or_ref, description, easyedit, easyedit_keys, cost, easyedit_notes))


# the built-in methods
register_method("rome", "editscale.edit.rome:Rome", "ROME (Meng et al. 2022): rank-one update of one MLP output matrix, C^-1 k* direction, "
                "key at the plain prompt", easyedit="ROME", cost="editscale.edit.rome:RomeCost")
register_method("r-rome", "editscale.edit.rome:RRome", "r-ROME (Gupta et al. 2024): ROME with the template-averaged key k* used in both places "
                "of the update", easyedit="R-ROME", cost="editscale.edit.rome:RomeCost",
                # EasyEdit's r_rome/compute_u.py and compute_v.py: which keys the two places of the update read
                easyedit_notes={
                    "enable_random_prefix_keys": ((True,), "both keys averaged over the context templates, editscale's r-rome "
                                                  "(false with original_implementation: true is the original ROME: --method rome)"),
                    "enable_prompt_keys": ((False,), "true reads both keys at the plain prompt, which no editscale method does "
                                           "(r-rome averages them over the context templates)"),
                    "original_implementation": (None, "no effect once enable_random_prefix_keys is true (both keys averaged over the templates)"),
                })
register_method("memit", "editscale.edit.memit:Memit", "MEMIT (Meng et al. 2023): least-squares batch update spread over several MLP layers",
                easyedit="MEMIT")
register_method("emmet", "editscale.edit.emmet:Emmet", "EMMET (Gupta et al. 2024): equality-constrained batch edit of one layer (B=1 equals r-ROME)",
                easyedit="EMMET", easyedit_notes={"layer_selection": (None, "read nowhere by EasyEdit's EMMET (emmet_main.py edits its one layer)")})
register_method("alphaedit", "editscale.edit.alphaedit:AlphaEdit", "AlphaEdit (Fang et al. 2025): MEMIT with the update projected on the null space "
                "of preserved keys", easyedit="AlphaEdit", cost="editscale.edit.alphaedit:AlphaEditCost",
                easyedit_notes={k: (None, "read nowhere by EasyEdit's AlphaEdit (AlphaEdit_main.py solves with the projection and L2, "
                                          "no second-moment term; so does editscale's)") for k in ("mom2_adjustment", "mom2_update_weight")})
register_method("encore", "editscale.edit.encore:Encore", "ENCORE (Gupta et al. 2025): MEMIT + norm penalty + earlier edits' keys, with "
                "most-probable early stopping", cost="editscale.edit.encore:EncoreCost")
register_method("nas", "editscale.edit.nas:Nas", "NAS (2026): AlphaEdit with each target value v* scaled to the unedited model's mean ||v*||, "
                "edits above 2x skipped", cost="editscale.edit.nas:NasCost")
register_method("rect", "editscale.edit.rect:Rect", "RECT (Gu et al. 2024): MEMIT with each update kept only at its top 40 % relative changes |dW / W|")
register_method("prune", "editscale.edit.prune:Prune", "PRUNE (Ma et al. 2025): ROME / MEMIT / AlphaEdit (base:) with the accumulated delta's "
                "singular values above sigma_max(W0) log-restrained", cost="editscale.edit.prune:PruneCost")
register_method("ultraedit", "editscale.edit.ultraedit:UltraEdit", "UltraEdit (Gu et al. 2025): one gradient pass per edit, lifelong-normalized "
                "[key | gradient], closed-form ridge update", easyedit="UltraEdit",
                easyedit_keys={"batch_size": "tuple_size"},  # EasyEdit's cases per forward / backward pass
                easyedit_notes={"token": (None, "read nowhere by EasyEdit's UltraEdit; editscale takes the keys at the answer tokens, "
                                                "the UltraEdit reference's `token: ans`")},
                cost="editscale.edit.ultraedit:UltraEditCost")
register_method("ft-c", "editscale.edit.ftc:FineTuneConstrained", "FT-C: constrained (L-inf bounded) fine-tuning of one MLP layer on the target",
                cost="editscale.edit.ftc:FineTuneCost")
# (new methods go last: a method's colour in the figures is its place here, editscale.report.plots.method_colors)
register_method("sphere", "editscale.edit.sphere:Sphere", "SPHERE (Liu et al. 2026): AlphaEdit with each update projected away from the "
                "principal hyperspherical directions of the weight (I - alpha U U^T)", easyedit="SPHERE", cost="editscale.edit.alphaedit:AlphaEditCost",
                easyedit_notes={k: (None, "read nowhere by EasyEdit's SPHERE (SPHERE_main.py solves AlphaEdit's system: projection and L2, "
                                          "no second-moment term; so does editscale's)") for k in ("mom2_adjustment", "mom2_update_weight")})
register_method("grace", "editscale.edit.grace:Grace", "GRACE (Hartvigsen et al. 2023): a codebook of keys, values and deferral radii at one "
                "MLP output module; inputs within a key's radius get its value, the weights stay",
                cost="editscale.edit.grace:GraceCost")
register_method("wise", "editscale.edit.wise:Wise", "WISE (Wang et al. 2024): a side copy of one MLP output matrix trained in random-masked "
                "shards merged by TIES, a router choosing main or side memory by activation", cost="editscale.edit.wise:WiseCost")
register_method("lyaplock", "editscale.edit.lyaplock:LyapLock", "LyapLock (Wang et al. 2025): MEMIT with a Lyapunov virtual queue weighting "
                "the preservation loss and the earlier edits' keys and values (dense updates)", cost="editscale.edit.lyaplock:LyapLockCost")
register_method("memoir", "editscale.edit.memoir:Memoir", "MEMOIR (Wang et al. 2025): a zero-initialized residual memory beside one MLP "
                "output matrix, written and read through sparse TopHash masks of the prompt's activations; the weights stay",
                cost="editscale.edit.memoir:MemoirCost")


class EditMethod:
    """Base class of an editing method.

    Class attributes:
        name: registry name.
        hparams_type: dataclass of the method's hyper-parameters (`editscale.edit.hparams`): every
            key a file may hold, its type, default, allowed values; `required_hparams` and
            `default_hparams` are derived from it.
        forced_hparams: values the method sets whatever the file says (keys not in hparams_type).
        update_kind: "lowrank" (factors u v^T), "dense" (a full matrix per update), "masked"
            (float64 factors and a mask: RECT) or "memory" (no weight update: the edit changes the
            method's memory, editscale.edit.memory; GRACE).
        memory_type: for a method that keeps a memory, its class (editscale.edit.memory.Memory),
            with the class methods `memory_modules(model, hparams)` (the modules it hooks) and
            `memory_widths(model, hparams)` (each field's row shape); None otherwise.
        batch_edits: whether `apply` computes one joint update for a batch of cases (MEMIT
            family, FT-C, UltraEdit); False (ROME family) makes edits_per_step > 1 an error.
        wraps: for a wrapper (PRUNE), the hparams key naming the method it wraps (`variant`
            returns the combined class); "" for a method that edits by itself.
        precomputed(hparams): what the stats stage must provide for the edit jobs (see there).
        template_rule: how the reference samples and averages context templates ("rome": one flat
            group from the document-start token; "memit": [["{}"], samples after five openers],
            keys averaged per group); see `editscale.edit.templates.sample_context_templates`.
        value_loss_layer: where the reference reads the value-optimization loss ("final": ROME's
            final logits; "max": MEMIT's layer max(v_loss_layer, injection layer)).

    Construction (once per segment):
        model, tok: the loaded model (eval mode, parameters requires_grad False) and its tokenizer
            (pad token set, right padding).
        hparams: the method's hyper-parameters, a mapping or an instance of `hparams_type` (see
            `load_hparams`); the method reads the typed ones, `self.hp` (`resolve_hparams`).
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
    memory_type: type | None = None
    batch_edits: bool = True
    wraps: str = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.required_hparams = hparams_spec.required(cls.hparams_type)
        cls.default_hparams = hparams_spec.defaults(cls.hparams_type)

    def __init__(self, model, tok, hparams: dict, stats: dict[str, torch.Tensor], context_templates: list[str], state: dict | None = None):
        self.model = model
        self.tok = tok
        self.hp = self.resolve_hparams(hparams, f"{self.name} hparams", n_layers(model))
        self.stats = stats or {}
        from .templating import template_groups

        if not context_templates:
            raise EditscaleError(f"{self.name}: no context templates (expected at least ['{{}}'])")
        self.context_templates = template_groups(context_templates)

    @classmethod
    def resolve_hparams(cls, hparams, source: str, layers_in_model: int | None = None):
        """The typed hyper-parameters (an instance of `hparams_type`) of a mapping or an instance:
        the declared defaults updated with its values (what the method forces left out), every
        problem of the values in one error naming `source`, then the method's cross-field rules
        and (given the model's layer count) the layer ranges. The workflow builds them at plan
        time; the edit jobs rebuild them from run.json."""
        values = dataclasses.asdict(hparams) if dataclasses.is_dataclass(hparams) and not isinstance(hparams, type) else dict(hparams)
        hp = {**cls.default_hparams, **{k: v for k, v in values.items() if k not in cls.forced_hparams}}
        cls.validate_hparams(hp, source=source)
        if layers_in_model is not None:
            cls.check_for_model(hp, layers_in_model, source=source)
        return hparams_spec.build(cls.hparams_type, hp)

    @property
    def hparams(self) -> dict:
        """The resolved values as a mapping, with what the method forces (run.json's record)."""
        return {**dataclasses.asdict(self.hp), **self.forced_hparams}

    @classmethod
    def variant(cls, hparams: dict) -> type:
        """The class that edits with `hparams`: `cls` itself, except for a wrapper whose hparams
        name the method it wraps (PRUNE's `base:`), which returns the combined class."""
        return cls

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


def get_method(name: str, hparams: dict | None = None) -> type[EditMethod]:
    """The class registered under `name` (imported on demand); with `hparams`, the class that
    edits with them (`EditMethod.variant`: a wrapper combined with the method it wraps)."""
    cls = _registered_class(name)
    return cls.variant(hparams) if hparams is not None else cls


def _registered_class(name: str) -> type[EditMethod]:
    return METHODS[name].load()


def describe_methods() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered method, for `editscale methods`."""
    return [(name, entry.description or name) for name, entry in METHODS.items()]


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


class LayerMemoryMethod(EditMethod):
    """A method whose edits change a memory at one layer's MLP output module (hparams `layer`)
    and no weight (GRACE, WISE, MEMOIR): it names that module, and checks the layer against the
    model; the subclass sets `memory_type` and `memory_widths`. An instance edits `module`
    (`module_obj`) and changes `memory`: the chain's (the run's memory so far), else a new one."""

    update_kind = "memory"
    batch_edits = False

    def __init__(self, model, tok, hparams: dict, stats, context_templates, state=None, memory=None):
        super().__init__(model, tok, hparams, stats, context_templates, state)
        self.module = self.memory_modules(model, self.hparams)[0]
        self.module_obj = get_module(model, self.module)
        self.memory = memory if memory is not None else new_memory(type(self), model, self.hparams)

    @staticmethod
    def modules(model, hparams) -> list[str]:
        return []  # no weight is edited

    @classmethod
    def check_for_model(cls, hp: dict, layers_in_model: int, source: str = "hparams") -> None:
        hparams_spec.check_layers(hp, layers_in_model, source, keys=("layer",))

    @staticmethod
    def memory_modules(model, hparams) -> list[str]:
        return [mlp_out_name(model, int(hparams["layer"]))]
