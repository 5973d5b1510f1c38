"""The study configuration: one schema, one loader, typed sections.

`editscale/schema.yaml` (config/schema.yaml in the workflow is a link to it) is the only source
of defaults. `validate` checks a config against it and fills in its defaults (the cross-reference
checks and the file loader, `prepare` / `load_config`, are editscale.workflow's).
`section(name, params)` turns one section (e.g. "metrics.generation", the JSON a rule passes to
its command) into a frozen dataclass with the schema's defaults, rejecting keys the schema does
not know, so that a command never restates a default.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
from pathlib import Path
from typing import Any

import yaml

from .io import EditscaleError, Problems

SCHEMA_PATH = Path(__file__).with_name("schema.yaml")


@functools.lru_cache(maxsize=1)
def _file_schema() -> dict:
    """The schema file with its `$defs` references written out in place, so that every section's
    node validates on its own (`section`)."""
    raw = yaml.safe_load(SCHEMA_PATH.read_text())
    return _inline_refs(raw, raw.get("$defs") or {})


def _inline_refs(node, defs: dict):
    if isinstance(node, list):
        return [_inline_refs(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _inline_refs(v, defs) for k, v in node.items()}
    ref = out.pop("$ref", None)
    if ref is not None:
        out = {**copy.deepcopy(defs[ref.removeprefix("#/$defs/")]), **out}
    return out


def eval_grid_schema(default) -> dict:
    """The schema of a metric's eval_every (the checkpoint grid, schema.yaml's $defs.eval_grid)."""
    return {**copy.deepcopy(_file_schema()["$defs"]["eval_grid"]), "default": default}


def schema() -> dict:
    """The schema file plus the metrics.<name> section of every plugin metric (its `schema`; the
    metric registry is found among editscale.registry.REGISTRIES: no plugin metric can exist
    before that registry's module was imported)."""
    from .registry import REGISTRIES

    metrics = REGISTRIES.get("metric")
    plugins = {m.name: m.schema for m in (metrics.values() if metrics is not None else ()) if m.schema is not None}
    if not plugins:
        return _file_schema()
    merged = copy.deepcopy(_file_schema())
    metric_props = merged["properties"]["metrics"]["properties"]
    for name, fragment in plugins.items():
        if name in metric_props:
            raise EditscaleError(f"plugin metric {name!r} redefines the built-in section metrics.{name}")
        node = {"type": "object", "additionalProperties": False, "default": {}, **copy.deepcopy(fragment)}
        grid = (node.get("properties") or {}).get("eval_every")
        if grid is not None:  # every metric's grid takes the same forms (linear, log-spaced, list)
            node["properties"]["eval_every"] = eval_grid_schema(grid.get("default", 50))
        metric_props[name] = node
    return merged


def _node(path: str) -> dict:
    node = schema()
    for part in path.split("."):
        props = node.get("properties") or {}
        if part not in props:
            raise EditscaleError(f"config section {path!r} is not in {SCHEMA_PATH.name} (known here: {sorted(props)})")
        node = props[part]
    return node


def section_schema(path: str) -> dict:
    """The schema node of one section, e.g. section_schema("metrics.history")."""
    return _node(path)


def section_defaults(path: str) -> dict:
    """The schema's defaults of one section, e.g. section_defaults("metrics.generation")."""
    return {k: copy.deepcopy(v["default"]) for k, v in (_node(path).get("properties") or {}).items() if "default" in v}


def validate(config: dict, source: str = "config") -> dict:
    """Validate against the schema and fill in its defaults, in place; one error naming the key.
    The config's `plugins:` are imported first: a plugin metric adds its section to the schema."""
    import jsonschema

    from .plugins import load_plugins

    plugins = config.get("plugins") or []
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise EditscaleError(f"{source}: plugins: must be a list of module names, got {plugins!r}")
    load_plugins(plugins)

    _fill_defaults(config, schema())
    _integral_floats_to_int(config, schema())
    validator = jsonschema.Draft202012Validator(schema())
    # a misspelt key first: it usually explains the "required" error beside it
    errors = sorted(validator.iter_errors(config), key=lambda e: (list(map(str, e.absolute_path)), e.validator != "additionalProperties"))
    problems = Problems()
    explained = set()  # (path, key): a required key that a misspelt key beside it stands for
    for e in errors:
        if e.validator == "additionalProperties" and isinstance(e.instance, dict):
            allowed = list(e.schema.get("properties") or {})
            explained |= {(tuple(e.absolute_path), near) for k in e.instance if k not in allowed
                          for near in difflib.get_close_matches(str(k), allowed, n=1)}
    for e in errors:
        missing = re.fullmatch(r"'(.+)' is a required property", e.message) if e.validator == "required" else None
        if missing and (tuple(e.absolute_path), missing.group(1)) in explained:
            continue
        with problems.check():
            where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            if e.validator == "additionalProperties" and isinstance(e.instance, dict):
                allowed = sorted((e.schema.get("properties") or {}))
                unknown = [k for k in e.instance if k not in allowed]
                near = difflib.get_close_matches(str(unknown[0]), allowed, n=1) if unknown else []
                line = _line_of(source, str(unknown[0])) if unknown else None
                raise EditscaleError(
                    f"{source}{f', line {line}' if line else ''}: {where}: unknown key {unknown[0]!r}"
                    + (f" (did you mean {near[0]!r}?)" if near else "") + f"; allowed keys: {', '.join(allowed)}"
                )
            raise EditscaleError(f"{source}: {where}: {_message(e)}")
    problems.raise_all()
    return config


def _message(error) -> str:
    """jsonschema's message; for a value that matches none of a oneOf's forms, the schema's
    description of the forms too (its bare message names none of them)."""
    if error.validator == "oneOf" and error.schema.get("description"):
        return f"{error.instance!r} is none of the allowed forms: {' '.join(error.schema['description'].split())}"
    return error.message


def _line_of(source: str, key: str) -> int | None:
    """The first line of the config file `source` that defines `key` (None if not a file)."""
    import re

    path = Path(source)
    if not path.is_file():
        return None
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if re.match(rf"^\s*-?\s*{re.escape(key)}\s*:", line):
            return i
    return None


def _fill_defaults(obj, node: dict) -> None:
    if isinstance(obj, dict) and node.get("type") == "object":
        for key, sub in (node.get("properties") or {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                _fill_defaults(obj[key], sub)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for key in obj:
                if key not in (node.get("properties") or {}):
                    _fill_defaults(obj[key], extra)
    elif isinstance(obj, list) and isinstance(node.get("items"), dict):
        for item in obj:
            _fill_defaults(item, node["items"])


def _integral_floats_to_int(obj, node: dict):
    """`segment: 3.0` means 3: an integral float where the schema wants an integer (and no form takes
    a float) becomes that int, in place, so that range() and every hash see one spelling of the
    number (JSON Schema accepts 3.0 as an integer and would pass the float on)."""
    node = _resolved(node)
    forms = [_resolved(f) for f in (node.get("oneOf") or node.get("anyOf") or [node])]
    if isinstance(obj, float) and obj.is_integer():
        kinds = [k for f in forms for k in _kinds(f)]
        return int(obj) if "integer" in kinds and "number" not in kinds else obj
    shape = "object" if isinstance(obj, dict) else "array" if isinstance(obj, list) else None
    form = next((f for f in forms if shape in _kinds(f)), None) if shape else None
    if shape == "object" and form is not None:
        props = form.get("properties") or {}
        extra = form.get("additionalProperties")
        for key in obj:
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                obj[key] = _integral_floats_to_int(obj[key], sub)
    elif shape == "array" and form is not None and isinstance(form.get("items"), dict):
        obj[:] = [_integral_floats_to_int(item, form["items"]) for item in obj]
    return obj


def _resolved(node: dict) -> dict:
    """A schema node with its local `$ref` (#/$defs/...) followed."""
    ref = node.get("$ref") if isinstance(node, dict) else None
    if not ref:
        return node
    target = _file_schema()
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return {**target, **{k: v for k, v in node.items() if k != "$ref"}}


def _kinds(node: dict) -> list[str]:
    kinds = node.get("type") or []
    return kinds if isinstance(kinds, list) else [kinds]


_JSON_TYPES = {"integer": int, "number": float, "boolean": bool, "string": str, "array": list, "object": dict, "null": type(None)}


def _py_type(node: dict):
    """The Python type of a schema node: its `type` (or the union of its oneOf / anyOf forms)."""
    forms = node.get("oneOf") or node.get("anyOf")
    kinds = node.get("type")
    if forms:
        types_ = [_py_type(f) for f in forms]
    elif kinds:
        types_ = [_JSON_TYPES.get(k, Any) for k in (kinds if isinstance(kinds, list) else [kinds])]
    else:
        return Any
    if Any in types_:
        return Any
    out = types_[0]
    for t in types_[1:]:
        out = out | t
    return out


@functools.lru_cache(maxsize=None)
def _section_type(path: str) -> type:
    """The frozen dataclass of one section: a field per schema property, typed from the schema."""
    props = _node(path).get("properties") or {}
    fields = [(k, _py_type(v), dataclasses.field(default=None)) for k, v in props.items()]
    return dataclasses.make_dataclass("Section_" + path.replace(".", "_"), fields, frozen=True)


def section(path: str, params: dict | None = None) -> Any:
    """One config section as a frozen dataclass: the schema's defaults updated with `params`
    (validated against the section's schema); an unknown key is one error with the nearest name."""
    import jsonschema

    params = dict(params or {})
    node = _node(path)
    props = node.get("properties") or {}
    unknown = sorted(set(params) - set(props))
    if unknown:
        near = difflib.get_close_matches(unknown[0], list(props), n=1)
        raise EditscaleError(f"{path}: unknown key {unknown[0]!r}" + (f" (did you mean {near[0]!r}?)" if near else "") + f"; known: {sorted(props)}")
    values = {**section_defaults(path), **params}
    _integral_floats_to_int(values, node)
    errors = list(jsonschema.Draft202012Validator(node).iter_errors(values))
    if errors:
        e = errors[0]
        raise EditscaleError(f"{path}.{'.'.join(str(p) for p in e.absolute_path)}: {_message(e)}")
    return _section_type(path)(**{k: values.get(k) for k in props})
