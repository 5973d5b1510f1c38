"""One registry type for every extension point: editing methods, metrics, dataset readers and
architectures (the lowest layer: it imports nothing of editscale but `io`).

A `Registry` maps a name to an entry that carries its own metadata (a `Metric`, an `ArchSpec`,
a `MethodEntry`, a `Reader`). Entries are added by `add` or by the `register` decorator; a name
already taken by a different entry is refused. References to code that should not be imported
until used (a method's class, a metric's `compute`, a figure function) are `module:attr`
strings, resolved by `resolve`; `Registry.check_refs` resolves every one of an entry so that a
misspelt reference is one error when the entry is loaded (a plugin: when the config is loaded,
i.e. at `snakemake -n`), not when the reference is first used hours later.

Each entry records as its `source` the module whose import added it (the innermost module body
on the stack: a built-in's own editscale module, a plugin's module), so that a plugin
(`editscale.plugins.load_plugins`) which registers nothing is an error, and a refused duplicate
names who holds the name. Installed packages add entries through the
registry's entry-point group (e.g. `editscale.methods`), loaded on first use of the registry.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .io import EditscaleError

T = TypeVar("T")

REGISTRIES: dict[str, "Registry"] = {}  # kind -> registry: every registry made (plugin loading counts their entries)
_LOADING: list[str] = []  # the plugin module being imported (innermost last)


def resolve(ref: str | Callable, what: str = "reference") -> Any:
    """The object a `module:attr` reference names (a callable is returned as it is); one error
    naming the reference when the module or the attribute is missing."""
    if not isinstance(ref, str):
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise EditscaleError(f"{what} {ref!r} is not of the form 'module:attribute'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise EditscaleError(f"{what} {ref!r}: module {module_name} cannot be imported ({exc})") from exc
        raise
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EditscaleError(f"{what} {ref!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _registering_module() -> str:
    """The module whose body is running an `add` (module doc); an entry point's, while it loads. An
    entry added at run time, outside any import, names the module of the code that added it."""
    if _LOADING and _LOADING[-1].startswith("entry point "):
        return _LOADING[-1]
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__") == __name__:  # the decorator's own frames
        frame = frame.f_back
    caller = frame.f_globals.get("__name__", "") if frame is not None else ""
    # the nearest module body that an import is running (importlib marks its spec while it runs);
    # the outermost body of the process (`__main__`, a pytest-xdist worker's `__channelexec__`) is none
    while frame is not None and not (frame.f_code.co_name == "<module>" and _being_imported(frame.f_globals.get("__name__", ""))):
        frame = frame.f_back
    return frame.f_globals["__name__"] if frame is not None else caller


def _being_imported(name: str) -> bool:
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


@contextlib.contextmanager
def loading_plugin(module_name: str):
    """Plugin `module_name` is being imported: the references of the entries it adds are checked."""
    _LOADING.append(module_name)
    try:
        yield
    finally:
        _LOADING.pop()


class Registry(Generic[T]):
    """name -> entry of one kind, in registration order (module doc).

    `refs(entry)` lists the entry's lazy references (checked by `check_refs`); `entry_points`
    is the importlib entry-point group through which installed packages add entries, each
    loaded object handed to `from_entry_point(name, obj)` (None: ignored)."""

    def __init__(self, kind: str, refs: Callable[[T], list[str]] | None = None, entry_points: str = "",
                 from_entry_point: Callable[[str, Any], T | None] | None = None, make: Callable[..., T] | None = None,
                 builtins: str = "", order: Callable[[T], Any] | None = None):
        if kind in REGISTRIES:
            raise EditscaleError(f"a registry of {kind}s exists already")
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._sources: dict[str, str] = {}
        self._refs = refs or (lambda entry: [])
        self.entry_points = entry_points
        self._from_entry_point = from_entry_point
        self._make = make
        self._builtins = builtins  # a package whose every module is imported on first read (they register themselves)
        self._order = order  # the entries' sort key (None: registration order)
        self._entry_points_loaded = not entry_points
        REGISTRIES[kind] = self

    # -- adding ---------------------------------------------------------------------------------

    def add(self, name: str, entry: T) -> T:
        """Add `entry` under `name`; a name taken by a different entry is an error (the same entry
        again, e.g. a module imported twice, is accepted)."""
        if not isinstance(name, str) or not name:
            raise EditscaleError(f"a {self.kind} needs a non-empty name, got {name!r}")
        old = self._entries.get(name)
        if old is not None and old != entry:
            raise EditscaleError(f"{self.kind} {name!r} is already registered ({self._describe(name)}); pick another name")
        self._entries[name] = entry
        if old is None:
            source = _registering_module()
            self._sources[name] = source
            if _LOADING and source in (_LOADING[-1], ""):  # a plugin's references are checked as it loads (module doc)
                self.check_refs(name)
        return entry

    def register(self, name: str, **metadata) -> Callable:
        """Decorator: `@REG.register("name", **metadata)` adds the decorated object, or the entry
        `make(name, obj, **metadata)` of a registry made with `make`; returns the object."""

        def decorate(obj):
            self.add(name, self._make(name, obj, **metadata) if self._make else obj)
            return obj

        return decorate

    # -- reading --------------------------------------------------------------------------------

    def _load_entry_points(self) -> None:
        """On first read: the built-in package's modules, then the installed packages' entry points."""
        if self._builtins:
            package, self._builtins = self._builtins, ""
            import pkgutil

            for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda i: i.name):
                importlib.import_module(f"{package}.{info.name}")
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.entry_points):
            if ep.name in self._entries:
                continue
            with loading_plugin(f"entry point {ep.value}"):
                entry = self._from_entry_point(ep.name, ep.load()) if self._from_entry_point else ep.load()
                if entry is not None and ep.name not in self._entries:
                    self.add(ep.name, entry)

    def __getitem__(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._entries:
            near = difflib.get_close_matches(str(name), list(self._entries), n=1)
            raise EditscaleError(f"unknown {self.kind} {name!r}" + (f" (did you mean {near[0]!r}?)" if near else "")
                                 + f"; registered: {sorted(self._entries)}")
        return self._entries[name]

    get = __getitem__

    def __contains__(self, name) -> bool:
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load_entry_points()
        names = list(self._entries)
        if self._order is not None:
            names.sort(key=lambda n: self._order(self._entries[n]))  # stable: ties keep registration order
        return iter(names)

    def __len__(self) -> int:
        self._load_entry_points()
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self)

    keys = names

    def values(self) -> list[T]:
        return [self._entries[n] for n in self]

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self]

    def source(self, name: str) -> str:
        """The module whose import added `name` (module doc)."""
        return self._sources.get(name, "")

    def _describe(self, name: str) -> str:
        return f"by {self._sources.get(name) or 'an unknown module'}"

    def check_refs(self, name: str | None = None) -> None:
        """Resolve every lazy reference of one entry (or of all): one error naming the entry."""
        for n in [name] if name else list(self._entries):
            for ref in self._refs(self._entries[n]):
                resolve(ref, what=f"{self.kind} {n!r}: reference")


def count_by_source(source: str) -> int:
    """How many entries, over every registry, the import of module `source` added (plugin loading's check)."""
    return sum(1 for reg in REGISTRIES.values() for s in reg._sources.values() if s == source)
