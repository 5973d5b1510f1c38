"""The one registry type (editscale.registry): methods, metrics, dataset readers and architectures
share it: duplicate names refused, lazy `module:attr` references checked when an entry loads,
metadata carried by the entry, plugins found by what they register."""

from __future__ import annotations

import pytest

from editscale.io import EditscaleError
from editscale.registry import REGISTRIES, Registry, resolve


@pytest.fixture
def scratch():
    made = []

    def make(kind, **kw):
        made.append(kind)
        return Registry(kind, **kw)

    yield make
    for kind in made:
        REGISTRIES.pop(kind, None)


def test_the_four_extension_points_are_registries():
    from editscale.data.readers import READERS
    from editscale.edit.methods import METHODS
    from editscale.evaluate.registry import METRICS
    from editscale.models.registry import ARCHITECTURES

    for reg in (METHODS, METRICS, READERS, ARCHITECTURES):
        assert isinstance(reg, Registry) and REGISTRIES[reg.kind] is reg and len(reg) > 0


def test_a_taken_name_is_refused_and_the_same_entry_again_is_not(scratch):
    reg = scratch("scratch thing")
    reg.add("a", (1, 2))
    reg.add("a", (1, 2))  # a module imported twice registers the same entry again
    with pytest.raises(EditscaleError, match=r"scratch thing 'a' is already registered \(by .*test_registry.*\); pick another name"):
        reg.add("a", (3,))
    with pytest.raises(EditscaleError, match=r"unknown scratch thing 'aa' \(did you mean 'a'\?\); registered: \['a'\]"):
        reg["aa"]


def test_entries_carry_an_order_and_register_by_decorator(scratch):
    reg = scratch("ordered thing", make=lambda name, fn, rank: (rank, fn), order=lambda e: e[0])

    @reg.register("late", rank=2)
    def late():
        return "late"

    @reg.register("early", rank=1)
    def early():
        return "early"

    assert reg.names() == ["early", "late"] and reg["late"][1] is late  # the decorator returns the function itself
    assert reg.source("late") == __name__  # the module whose body registered it


def test_references_resolve_lazily_with_one_error_naming_them():
    assert resolve("editscale.io:EditscaleError") is EditscaleError
    with pytest.raises(EditscaleError, match="'editscale.io:NoSuch': editscale.io has no attribute 'NoSuch'"):
        resolve("editscale.io:NoSuch")
    with pytest.raises(EditscaleError, match="module no_such_module cannot be imported"):
        resolve("no_such_module:f")
    with pytest.raises(EditscaleError, match="not of the form 'module:attribute'"):
        resolve("editscale.io.EditscaleError")


def test_every_built_in_reference_resolves():
    """The built-ins' lazy references (method classes, metric compute / cost / figure functions)
    are checked here; a plugin's are checked as it loads."""
    from editscale.edit.methods import METHODS, EditMethod
    from editscale.evaluate.registry import METRICS

    for reg in (METHODS, METRICS):
        reg.check_refs()
    assert all(issubclass(METHODS[name].load(), EditMethod) for name in METHODS)
    builtin = [m.name for m in METRICS.values() if METRICS.source(m.name).startswith("editscale.evaluate.metrics.")]
    assert builtin == ["edit_scores", "history", "downstream", "perplexity", "generation", "weights"]


def test_a_plugin_with_a_bad_reference_fails_when_it_loads(tmp_path, monkeypatch):
    """A plugin metric naming a figure function that does not exist is one error at load (i.e. at
    `snakemake -n`), naming the metric and the reference, not a failure of the report hours later."""
    from editscale.evaluate.registry import METRICS
    from editscale.plugins import load_plugins

    (tmp_path / "bad_figure_plugin.py").write_text(
        "from editscale.evaluate.registry import metric\n"
        "@metric('bad_fig', 'a metric with a misspelt figure', inputs=('state',), figures={'x': 'bad_figure_plugin:no_such_chart'},\n"
        "        schema={'properties': {'eval_every': {'type': 'integer', 'default': 1}}})\n"
        "def compute(checkpoint, cfg):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(EditscaleError, match=r"metric 'bad_fig': reference 'bad_figure_plugin:no_such_chart': bad_figure_plugin has no attribute"):
            load_plugins(["bad_figure_plugin"])
    finally:
        METRICS._entries.pop("bad_fig", None)


def test_a_reader_and_an_architecture_are_entries_with_their_metadata(tmp_path):
    import json

    from editscale.data.readers import READERS, detect_reader
    from editscale.models.registry import ARCHITECTURES, arch_spec

    path = tmp_path / "cf.json"
    path.write_text(json.dumps([{"requested_rewrite": {}, "case_id": 0}]))
    assert READERS["counterfact"].format_keys == {"requested_rewrite"} and detect_reader(path) == "counterfact"
    assert arch_spec("gpt2") is ARCHITECTURES["gpt2"] and ARCHITECTURES["gpt2"].weight_in_out
    with pytest.raises(EditscaleError, match="register_architecture"):
        arch_spec("no_such_family")
