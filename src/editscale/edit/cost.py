"""What `editscale doctor` estimates an editing method's jobs by: a planning-side spec per method,
kept apart from the method's class (the edit chain never reads it).

A method's registry entry names its spec class (`MethodEntry.cost`, a `module:Class`
reference; `CostSpec` when it names none). `method_cost(name, hparams)` builds the spec of a run;
editscale.planning reads it.
"""

from __future__ import annotations


class CostSpec:
    """The default cost model of a locate-then-edit method; a method whose cost differs subclasses
    it in its own module.

    solve: how the closed-form part of one edit is counted: "per_segment" (one factorization of C
    per segment, a triangular solve per edit: ROME family), "per_edit" (a d x d solve per edit:
    MEMIT family), "gradient" (one forward / backward pass and a d x d solve per edit, no value
    optimization: UltraEdit) or "none" (fine-tuning)."""

    solve: str = "per_edit"

    def __init__(self, method_cls, hparams: dict):
        self.method, self.hparams = method_cls, hparams

    def extra_solve_flops(self, shapes: dict[str, tuple[int, int]]) -> float:
        """Float64 FLOPs per edit beyond `solve`'s (PRUNE's SVDs). 0 by default."""
        return 0.0

    def factor_rank(self, target_tokens: float) -> float:
        """Rank of one edit's stored factors per edited module (bytes/edit): 1 for the rank-one
        methods; a method that writes one rank per target token returns `target_tokens` (the
        doctor's mean target length in tokens)."""
        return 1.0

    def begin_flops(self, flops_per_prompt_step: float) -> float:
        """Model FLOPs of the method's `begin` (once per chain, counted in its first segment's job,
        e.g. an anchor computed before the first edit), given the FLOPs of one optimization step
        over one edit prompt. 0 by default."""
        return 0.0

    def device_matrices(self) -> tuple[float, float]:
        """(resident, transient): how many float64 [d_in, d_in] matrices the edit job holds per
        edited module for the whole segment (second moments, projections, factors kept), and at
        most at once while one module's update is solved (the memory estimate). Derived from the
        method's `precomputed` and `solve`; a method holding more says so."""
        needs = self.method.precomputed(self.hparams)
        resident = float("mom2" in needs) + float("nullspace" in needs)
        if self.solve == "per_segment" and "mom2" in needs:
            resident += 1  # the Cholesky factor of C, kept for the segment
        transient = {"per_edit": 3.0, "gradient": 2.0}.get(self.solve, 0.0)  # the system, its factor, a sum
        return resident, transient

    def memory_op_bytes(self, d_out: int, d_in: int) -> float:
        """For a method that keeps a memory (update_kind "memory"): bytes one edit's memory ops
        store per memory module of shape (d_out, d_in) (the factors files)."""
        raise NotImplementedError(f"{type(self).__name__}: a memory method's cost spec says what its memory ops store")

    def memory_bytes(self, k: int, d_out: int, d_in: int) -> float:
        """For a method that keeps a memory: bytes of its memory after k edits (a checkpoint's delta file)."""
        raise NotImplementedError(f"{type(self).__name__}: a memory method's cost spec says how its memory grows")

    def state_bytes(self, k: int, shapes: dict[str, tuple[int, int]]) -> float:
        """Bytes of the method state (`EditMethod.state_dict`) a segment's factors file holds after
        edit k, over the edited modules {name: (d_out, d_in)}: 0 for a stateless method."""
        return 0.0

    def value_prompts(self) -> tuple[int, float]:
        """(prompts, tokens per prompt) of one edit's optimization pass, whose activations are kept
        for the backward pass (the memory estimate): the rewriting prompts of the context templates
        (template length + ~12 tokens of prompt and target) for a value optimization."""
        params = self.hparams.get("context_template_length_params", [[5, 10], [10, 10]])
        n = sum(int(c) for _, c in params)
        mean_len = sum(int(length) * int(c) for length, c in params) / max(n, 1)
        return 1 + n, mean_len + 12


def cost_class(name: str) -> type[CostSpec]:
    """The cost spec class method `name`'s registry entry names (CostSpec when none)."""
    from ..registry import resolve
    from .methods import METHODS

    entry = METHODS[name]
    return resolve(entry.cost, what=f"method {name!r}: cost") if entry.cost else CostSpec


def method_cost(name: str, hparams: dict) -> CostSpec:
    """The cost spec of method `name` run with `hparams` (a wrapper's builds on the wrapped method's)."""
    from .methods import get_method

    return cost_class(name)(get_method(name, hparams), hparams)
