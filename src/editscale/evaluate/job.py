"""The metric job: what every metric shares, so that a metric is only `compute(checkpoint, cfg)`.

`Checkpoint` is what a metric computes from: the model after k edits and what the metric
declared (registry `inputs`), each read on first use. `run_metric` evaluates one metric there
and writes its table (results/{run}/metrics/{metric}/{k:06d}.parquet) atomically, with
provenance: config_hash (sha256 of the resolved section without eval_every), params, the
hashes of the inputs it was computed from, the device, the evaluation key, the seconds taken.

The evaluation key is what a table was computed from, as one hash: the section's params as
handed over and the content of every declared input file (plus k and the model directory).
`editscale evaluate` recomputes a file whose key differs from the current one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from pathlib import Path

from ..io import EditscaleError, provenance, read_jsonl, sha256_json, write_parquet_atomic
from .registry import INPUT_KINDS, MULTI_FILE_KINDS, Metric

log = logging.getLogger(__name__)


def content_record(path) -> dict:
    """editscale.edit.chain.content_record ({"content_sha256"} of a delta / factors file, verified,
    else {"sha256"} of the bytes), once per file content in this process: a checkpoint job's
    metrics all hash the same delta and factors files (staleness check, evaluation key, provenance).
    By content, so a segment recomputed bit for bit keeps every later evaluation key."""
    st = Path(path).stat()
    return dict(_content_record_cached(str(Path(path).resolve()), st.st_mtime_ns, st.st_size))


def content_identity(path) -> str:
    """The identity of a file's content (`content_record`'s hash)."""
    return next(iter(content_record(path).values()))


@functools.lru_cache(maxsize=256)
def _content_record_cached(path: str, mtime_ns: int, size: int) -> tuple:
    from ..edit.chain import content_record as record

    return tuple(record(path).items())


def parse_params(text: str | None) -> dict:
    """A metric section given as JSON text, @FILE or a path to a .json file."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("@") or (text.endswith(".json") and Path(text).exists()):
        path = Path(text.lstrip("@"))
        if not path.exists():
            raise EditscaleError(f"--params-json file {path} not found")
        text = path.read_text()
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EditscaleError(f"--params-json is not valid JSON: {exc}") from exc
    if not isinstance(params, dict):
        raise EditscaleError("--params-json must be a JSON object")
    return params


def metric_section(name: str, params: dict):
    """(typed section, its provenance dict) of metrics.<name>: the schema's defaults updated with
    `params`; the dict is everything but eval_every (a checkpoint's table does not depend on the
    grid around it)."""
    from ..config import section, section_schema

    cfg = section(f"metrics.{name}", params)
    # an option marked `x-key: when-set` in the schema (added after studies were run) enters the
    # key only when set: adding it to editscale re-runs no finished checkpoint
    when_set = {k for k, v in (section_schema(f"metrics.{name}").get("properties") or {}).items() if v.get("x-key") == "when-set"}
    return cfg, {k: v for k, v in dataclasses.asdict(cfg).items() if k != "eval_every" and not (k in when_set and v is None)}


class ModelCache:
    """The models a job has replayed, by (model_dir, delta, factors, k, dtype, device): the metrics
    of one checkpoint job share one load and replay (they only read the model)."""

    def __init__(self):
        self._models: dict = {}

    def get(self, key, load):
        if key in self._models:
            log.info("model after %d edits: loaded and replayed once for this checkpoint job, re-used", key[3])
        else:
            t0 = time.time()
            self._models[key] = load()
            log.info("model after %d edits: loaded and replayed in %.1f s", key[3], time.time() - t0)
        return self._models[key]


class Checkpoint:
    """The model after k edits of a run, and the declared inputs of one metric (module doc).

    model_dir, k, device, dtype: where and how; files: input kind -> the paths handed over (only
    the kinds the metric declares)."""

    def __init__(self, model_dir, k: int, files: dict[str, list[str]], device: str = "auto", dtype: str | None = None,
                 cache: ModelCache | None = None):
        self.model_dir, self.k, self.device = str(model_dir), int(k), device
        self.files = {kind: list(paths) for kind, paths in files.items() if paths}
        self._dtype = dtype
        self._cache = cache or ModelCache()
        self._extra_inputs: dict[str, str] = {}

    # -- the run and its state ------------------------------------------------------------------

    def input(self, kind: str) -> str:
        """The one file of a single-file input kind (edits, heldout)."""
        paths = self.files.get(kind) or []
        if not paths:
            raise EditscaleError(f"no {INPUT_KINDS.get(kind, kind)} file handed over (input `{kind}`)")
        return paths[0]

    @functools.cached_property
    def run(self) -> dict:
        """The run record: the run.json among the state files."""
        hits = [Path(p) for p in self.files.get("state", []) if Path(p).name == "run.json"]
        if len(hits) != 1:
            raise EditscaleError(f"--state must hold the run's run.json exactly once (got {self.files.get('state', [])})")
        return json.loads(hits[0].read_text())

    @property
    def segment(self) -> int:
        segment = int(self.run.get("segment", 0) or 0)
        if segment <= 0:
            raise EditscaleError(f"the run.json among --state has no `segment` ({self.files.get('state')})")
        return segment

    @property
    def dtype(self) -> str:
        return self._dtype or self.run.get("dtype") or "float32"

    @functools.cached_property
    def state(self):
        """The layout.StateFiles of checkpoint k among the state files."""
        from ..layout import StateFiles

        return StateFiles.among(self.files.get("state", []), self.k, self.segment) if self.k > 0 else StateFiles.unedited()

    @functools.cached_property
    def segment_files(self):
        """(the delta the segment ending at k starts from, its factors): input segment_factors."""
        from ..layout import segment_files

        return segment_files(self.files.get("segment_factors", []), self.k, self.segment)

    def edits(self) -> list[dict]:
        """The run's edit cases, in edit order (input `edits`)."""
        path = Path(self.input("edits"))
        if not path.exists():
            raise EditscaleError(f"{path} not found: the run's edit sequence (rule `sequence`) must exist")
        cases = read_jsonl(path)
        for c in cases:
            if "edit_index" not in c:
                raise EditscaleError(f"{path}: case {c.get('case_id')!r} has no edit_index")
        return sorted(cases, key=lambda c: int(c["edit_index"]))

    # -- the model ------------------------------------------------------------------------------

    def model(self):
        """(model, tokenizer) after k edits, shared by the metrics of this job."""
        from ..edit.chain import model_at

        state = self.state
        key = (self.model_dir, str(state.delta), str(state.factors), state.k, self.dtype, self.device)
        return self._cache.get(key, lambda: model_at(self.model_dir, state, dtype=self.dtype, device=self.device))

    def edited_modules(self, model) -> list[str]:
        """The modules the run's method edits (names of `model`, a loaded or shapes-only model)."""
        from ..edit.methods import get_method

        run = self.run
        return get_method(run["method"], run["hparams"]).modules(model, run["hparams"])

    def unedited(self, model, tok):
        """A `with` block in which (model, tok) read as the unedited model: the edited matrices
        swapped back to the base weights (models.load.UneditedView, no second copy of the model);
        the model itself at k = 0."""
        from ..models.load import UneditedView

        if self.k == 0:
            return contextlib.nullcontext((model, tok))
        return UneditedView(model, tok, self.model_dir, self.edited_modules(model))

    def states_in_segment(self):
        """(j, model, tok) for each edit j of the segment ending at k (input segment_factors)."""
        from ..edit.chain import states_in_segment

        start_delta, factors = self.segment_files
        return states_in_segment(self.model_dir, start_delta, factors, dtype=self.dtype, device=self.device)

    # -- provenance -----------------------------------------------------------------------------

    def uses(self, role: str, path) -> None:
        """Record a data file the table was computed from (its sha256 goes into the provenance)."""
        self._extra_inputs[role] = content_identity(path)

    def provenance_inputs(self) -> dict:
        """The model's sha256, {path, sha256 or content_sha256} of each declared file the table was
        computed from (the audit re-hashes those paths), then the data files recorded with `uses`."""
        from ..models.load import model_sha

        out: dict = {"model": model_sha(self.model_dir)}
        files = {"edits": self.files.get("edits", [None])[0]}
        files.update(delta=self.state.delta, factors=self.state.factors)
        if self.files.get("segment_factors"):
            files["segment_start"], files["segment_factors"] = self.segment_files
        for role, path in files.items():
            if path is not None and Path(path).exists():
                out[role] = {"path": str(path), **content_record(path)}
        out.update(self._extra_inputs)
        return out

    def evaluation_key(self, params: dict) -> str:
        """The evaluation key (module doc) for the section `params` as handed over."""
        paths = sorted({str(p) for paths in self.files.values() for p in paths})
        return sha256_json({"params": params, "files": {p: content_identity(p) for p in paths if Path(p).is_file()},
                            "k": self.k, "model": self.model_dir})


def declared_files(metric: Metric, files: dict[str, list[str]]) -> dict[str, list[str]]:
    """The files of each input kind `metric` declares (one for a single-file kind)."""
    return {kind: list(files.get(kind) or [])[: None if kind in MULTI_FILE_KINDS else 1] for kind in metric.inputs}


def run_metric(metric: Metric, checkpoint: Checkpoint, params: dict, out) -> None:
    """Compute `metric` at `checkpoint` with its section `params` and write its table (module doc)."""
    from ..models.load import pick_device
    from ..registry import resolve

    t0 = time.time()
    cfg, resolved = metric_section(metric.name, params)
    compute = resolve(metric.compute, what=f"metric {metric.name!r}: compute")
    df = compute(checkpoint, cfg)
    seconds = time.time() - t0
    meta = provenance(config_hash=sha256_json(resolved), inputs=checkpoint.provenance_inputs(), device=str(pick_device(checkpoint.device)))
    meta["params"] = json.dumps(resolved, sort_keys=True)
    meta["evaluation_key"] = checkpoint.evaluation_key(params)
    meta["seconds"] = f"{seconds:.2f}"
    write_parquet_atomic(df, out, metadata=meta)
    log.info("wrote %s (%d rows, %.1f s)", out, df.height, seconds)
