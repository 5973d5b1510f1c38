"""Plugin loading: the config's `plugins:` modules and EDITSCALE_PLUGINS (which the Snakefile sets
so that every job sees the same plugins). Lowest layer: a plugin registers into whichever
registries it imports (editscale.registry), and nothing here names a stage."""

from __future__ import annotations

import importlib
import os
import sys

from .io import EditscaleError
from .registry import count_by_source, loading_plugin

_LOADED: set[str] = set()


def load_plugins(modules=()) -> None:
    """Import each plugin module once per process; its import registers what it defines (entries
    record the module as their source, and their `module:attr` references are resolved then). A
    module that registers nothing is an error: a plugin whose registration is missing would
    otherwise be ignored."""
    names = [*modules, *filter(None, os.environ.get("EDITSCALE_PLUGINS", "").split(","))]
    for module_name in dict.fromkeys(names):
        if module_name in _LOADED:
            continue
        fresh = module_name not in sys.modules
        with loading_plugin(module_name):
            try:
                importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                raise EditscaleError(f"plugin module {module_name!r} cannot be imported ({exc}); is it on PYTHONPATH?") from exc
        if fresh and count_by_source(module_name) == 0:
            raise EditscaleError(f"plugin module {module_name!r} registered nothing (it must add an entry to a registry, "
                                 "e.g. editscale.edit.methods.register_method or editscale.evaluate.registry.register_metric)")
        _LOADED.add(module_name)
