"""Typed hyper-parameters: each editing method declares its own as a dataclass.

A field's annotation is its type (int, float, bool, str, list[int], list[list[int]], X | None),
its default is the method's default (no default: required), and `spec(...)` metadata adds the
allowed values, a lower bound and a one-line description. `check(fields, data, source)` is the one
validation every hparams file, `hparams_overrides` and programmatic dict goes through:

    unknown key (with the nearest known names), missing required key, wrong type, value not
    allowed, value below its bound, and (given the model's layer count) a layer out of range

each as one EditscaleError naming the source (file or config key), the key and what is allowed.
Method-specific cross-field rules stay in the method's `validate_hparams`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from ..io import EditscaleError


def read_file(path) -> dict:
    """A hyper-parameter YAML file as a mapping ({} when empty); one error naming the file."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.exists():
        raise EditscaleError(f"hparams file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EditscaleError(f"hparams file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise EditscaleError(f"hparams file {path} must hold a mapping of names to values")
    return data


def spec(default: Any = dataclasses.MISSING, *, choices: tuple = (), minimum: float | None = None, maximum: float | None = None,
         doc: str = ""):
    """A hyper-parameter field: default (a list default is copied per use), allowed values,
    inclusive lower and upper bounds, description."""
    meta = {"choices": tuple(choices), "minimum": minimum, "maximum": maximum, "doc": doc}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: _copy(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _copy(value):
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def fields(hparams_type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(hparams_type)}


def defaults(hparams_type) -> dict:
    """The declared defaults (required keys left out)."""
    out = {}
    for name, f in fields(hparams_type).items():
        if f.default is not dataclasses.MISSING:
            out[name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[name] = f.default_factory()
    return out


def required(hparams_type) -> tuple[str, ...]:
    return tuple(n for n in fields(hparams_type) if n not in defaults(hparams_type))


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "integer", float: "number", bool: "boolean", str: "string"}.get(tp, str(tp))


def _is(value, tp) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_is(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _numbers(value) -> list:
    if isinstance(value, list):
        return [x for v in value for x in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def check(hparams_type, data: dict, source: str, method: str, partial: bool = False) -> None:
    """Validate `data` against the method's declared fields (see module doc); `partial` (for
    `hparams_overrides` on their own) skips the missing-key check. Every problem of `data` is
    reported in one error (one per line after the first), so that a file is fixed in one go."""
    known = fields(hparams_type)
    hints = typing.get_type_hints(hparams_type)
    problems = []
    for key in sorted(set(data) - set(known)):
        near = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
        problems.append(f"unknown key {key!r} for method {method!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                        + f"; {method} takes: {sorted(known)}")
    if not partial:
        missing = [k for k in required(hparams_type) if k not in data]
        if missing:
            problems.append(f"missing required key(s) {missing} for method {method!r}")
    for key, value in data.items():
        if key not in known:
            continue
        f, tp = known[key], hints[key]
        if not _is(value, tp):
            problems.append(f"{key!r} must be a {_type_name(tp)}, got {value!r} ({type(value).__name__})")
            continue
        choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
        if choices and value not in choices:
            problems.append(f"{key!r} = {value!r} is not allowed for method {method!r}; allowed: {list(choices)}")
        if minimum is not None and any(x < minimum for x in _numbers(value)):
            problems.append(f"{key!r} = {value!r} must be >= {minimum}")
        maximum = f.metadata.get("maximum")
        if maximum is not None and any(x > maximum for x in _numbers(value)):
            problems.append(f"{key!r} = {value!r} must be <= {maximum}")
    if problems:
        more = "".join(f"\n  {source}: {p}" for p in problems[1:])
        err = EditscaleError(f"{source}: {problems[0]}" + (f" ({len(problems)} problems){more}" if more else ""))
        err.problems = [f"{source}: {p}" for p in problems]  # each on its own (io.Problems, import-easyedit)
        raise err


def build(hparams_type, data):
    """The typed hyper-parameters: an instance of `hparams_type` from a mapping (its keys that are
    fields of the type; values copied) or from another hparams instance; an instance of the type
    is returned as it is. Validation is `check`'s (callers validate first)."""
    if isinstance(data, hparams_type):
        return data
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    names = fields(hparams_type)
    return hparams_type(**{k: _copy(v) for k, v in data.items() if k in names})


def check_layers(data: dict, n_layers: int, source: str, keys: tuple[str, ...] = ("layers", "v_loss_layer")) -> None:
    """Every layer index in `keys` lies in [0, n_layers)."""
    for key in keys:
        if key not in data:
            continue
        bad = [x for x in _numbers(data[key]) if not 0 <= x < n_layers]
        if bad:
            raise EditscaleError(f"{source}: {key!r} = {data[key]!r} is out of range for this {n_layers}-layer model (allowed: 0..{n_layers - 1})")


def describe(hparams_type) -> list[dict]:
    """One row per field (name, type, default or 'required', allowed values, description)."""
    dflt = defaults(hparams_type)
    hints = typing.get_type_hints(hparams_type)
    return [
        {"name": n, "type": _type_name(hints[n]), "default": dflt.get(n, "required"),
         "choices": list(f.metadata.get("choices") or ()), "doc": f.metadata.get("doc", "")}
        for n, f in fields(hparams_type).items()
    ]
