"""Convert the statistics researchers share into editscale's files: the ROME authors' layer
statistics (.npz; AlphaEdit's and EasyEdit's caches are the same `layer_stats` files) into the stats
HDF5, and AlphaEdit's / EasyEdit's null-space projections (.pt) into projection HDF5.

ROME and MEMIT (kmeng01/rome, kmeng01/memit, rome/layer_stats.py) cache the second moment of the
edited MLP matrix's input over 100,000 Wikipedia articles and publish the files at

    https://rome.baulab.info/data/stats/<model>/wikipedia_stats/<module>_<precision>_mom2_<n>.npz
    e.g. gpt2-xl/wikipedia_stats/transformer.h.17.mlp.c_proj_float32_mom2_100000.npz
         EleutherAI_gpt-j-6B/wikipedia_stats/transformer.h.5.mlp.fc_out_float32_mom2_100000.npz

Layout (util/runningstats.py): `tally` saves `CombinedStat(mom2=SecondMoment()).state_dict()` with
`numpy.savez`, plus the tally argument `sample_size`:

    mom2.constructor  0-d str   "util.runningstats.SecondMoment()"
    mom2.count        0-d int   number of token vectors added (every non-padding token)
    mom2.mom2         [d, d]    the running SUM of k k^T, in the collection precision (float32)
    sample_size       0-d       number of articles (100000), or a NaN-boxed null

`SecondMoment.moment()` = mom2 / count is what ROME inverts. A bare `SecondMoment().save(f)` has the
same keys without the "mom2." prefix; both layouts are read. editscale stores E[k k^T] = sum / count
in float64 (editscale.stats.mom2.write_mom2), so the converted file is a drop-in replacement for
results/stats/{model}/{corpus}/{module}.h5 (see docs/scale.md for using it in the workflow).

The articles are truncated to the model's context (1024 tokens for GPT-2 XL, 2048 for GPT-J) and
the sum is accumulated in float32: expect relative differences of order 1e-4..1e-3 from a float64
recomputation, and a different token sample than editscale's own `hf_dataset` corpus.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..io import EditscaleError, sha256_file
from .mom2 import write_mom2

log = logging.getLogger(__name__)

ROME_STATS_URL = "https://rome.baulab.info/data/stats"
# <module>_<precision>_<stats joined by '-'>[_t<batch_tokens>][_<sample_size>].npz
_NAME = re.compile(r"^(?P<module>.+?)_(?P<precision>float16|float32|float64)_(?P<stats>[a-z0-9_-]+?)(?:_t\d+)?(?:_(?P<n>\d+))?\.npz$")


def rome_stats_url(model_name: str, module: str, sample_size: int = 100_000, precision: str = "float32",
                   dataset: str = "wikipedia") -> str:
    """The published file for a model ("gpt2-xl", "EleutherAI/gpt-j-6B") and module."""
    return f"{ROME_STATS_URL}/{model_name.replace('/', '_')}/{dataset}_stats/{module}_{precision}_mom2_{sample_size}.npz"


def module_from_filename(path: str | Path) -> str | None:
    m = _NAME.match(Path(path).name)
    return m.group("module") if m else None


def _scalar(value: np.ndarray) -> Any:
    arr = np.asarray(value)
    if arr.ndim != 0:
        return arr
    item = arr.item()
    if isinstance(item, float) and np.isnan(item):
        return None  # runningstats' NaN-boxed null
    return item


def read_rome_npz(path: str | Path) -> dict[str, Any]:
    """{"sum": [d, d] array as stored, "count": int, "sample_size": int | None, "constructor": str | None,
    "prefix": "mom2." or ""} from a runningstats SecondMoment cache file."""
    path = Path(path)
    if not path.is_file():
        raise EditscaleError(f"ROME stats file {path} not found (download it from {ROME_STATS_URL}/<model>/wikipedia_stats/)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise EditscaleError(f"{path} is not a readable .npz file: {exc}") from exc
    for prefix in ("mom2.", ""):
        if f"{prefix}mom2" in data and f"{prefix}count" in data:
            break
    else:
        raise EditscaleError(
            f"{path} has no SecondMoment state (expected keys 'mom2.mom2' and 'mom2.count', as ROME's layer_stats "
            f"writes them, or 'mom2' and 'count'); keys: {sorted(data)}"
        )
    constructor = data.get(f"{prefix}constructor")
    constructor = None if constructor is None else str(_scalar(constructor))
    if constructor is not None and not constructor.endswith("SecondMoment()"):
        raise EditscaleError(f"{path}: '{prefix}constructor' is {constructor!r}, not a SecondMoment (uncentred second moment)")
    total = np.asarray(data[f"{prefix}mom2"])
    count = _scalar(data[f"{prefix}count"])
    if not isinstance(count, (int, np.integer)) or isinstance(count, bool) or count <= 0:
        raise EditscaleError(f"{path}: '{prefix}count' must be a positive integer, got {count!r}")
    if total.ndim != 2 or total.shape[0] != total.shape[1]:
        raise EditscaleError(f"{path}: '{prefix}mom2' must be a square matrix, got shape {total.shape}")
    if not np.issubdtype(total.dtype, np.floating):
        raise EditscaleError(f"{path}: '{prefix}mom2' has dtype {total.dtype}, expected a float type")
    sample_size = _scalar(data["sample_size"]) if "sample_size" in data else None
    return {"sum": total, "count": int(count), "sample_size": None if sample_size is None else int(sample_size),
            "constructor": constructor, "prefix": prefix}


def convert_rome_stats(
    npz: str | Path,
    model_dir: str | Path,
    out: str | Path,
    module: str | None = None,
    corpus: str = "rome-wikipedia",
    source_url: str | None = None,
) -> dict[str, Any]:
    """Write editscale's stats HDF5 for `module` of the prepared model from a ROME .npz; returns a summary.

    Checks that the module exists in the model's architecture and that its input dimension equals
    the matrix size (a file for another model or layer type is an error, not a silent mismatch).
    """
    from ..models.registry import module_shapes
    from ..models.load import model_sha, read_manifest

    npz = Path(npz)
    module = module or module_from_filename(npz)
    if not module:
        raise EditscaleError(f"cannot tell the module from the file name {npz.name!r}: pass --module (e.g. transformer.h.17.mlp.c_proj)")
    manifest = read_manifest(model_dir)
    stat = read_rome_npz(npz)
    from transformers import AutoConfig

    d_out, d_in = module_shapes(AutoConfig.from_pretrained(str(model_dir)), [module])[module]
    d = stat["sum"].shape[0]
    if d != d_in:
        raise EditscaleError(
            f"{npz}: second moment is {d} x {d} but the input of {module} in {model_dir} "
            f"({manifest.get('source')}) has dimension {d_in}: the file is for another model or module"
        )
    # Divide in float64: the stored float32 sum has ~1e7..1e8 terms; do not add rounding on top.
    mom2 = stat["sum"].astype(np.float64) / float(stat["count"])
    mom2 = (mom2 + mom2.T) / 2
    if not np.all(np.isfinite(mom2)):
        raise EditscaleError(f"{npz}: the second moment contains NaN or Inf")
    npz_sha = sha256_file(npz)
    spec = {
        "kind": "rome_npz",
        "file": npz.name,
        "source": source_url or str(npz),
        "npz_sha256": npz_sha,
        "sample_size": stat["sample_size"],
        "precision": str(stat["sum"].dtype),
        "constructor": stat["constructor"],
    }
    sha = model_sha(model_dir)
    write_mom2(out, mom2, stat["count"], module=module, model_sha256=sha, corpus=corpus, corpus_spec=spec,
               dtype=str(stat["sum"].dtype), inputs={"rome_npz": npz_sha})
    log.info("convert-stats: %s (%s, %d tokens, %s samples) -> %s for %s", npz, module, stat["count"],
             stat["sample_size"], out, model_dir)
    return {"out": str(out), "module": module, "dim": d, "count": stat["count"], "sample_size": stat["sample_size"],
            "model_sha256": sha, "npz_sha256": npz_sha, "precision": str(stat["sum"].dtype)}


# ---------------------------------------------------------------------------------------------
# AlphaEdit's and EasyEdit's null-space projections

def read_projection_pt(path: str | Path):
    """The projections of a `null_space_project.pt`: AlphaEdit's experiments/evaluate.py writes
    `torch.save(P, "null_space_project.pt")` with P a float32 tensor [len(hparams.layers), d, d] (row
    i for the i-th edited layer, U0 U0^T of `get_project`), and EasyEdit's AlphaEdit ships and reads
    the same tensor (examples/null_space_project_<model>.pt). A single [d, d] matrix is one layer."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise EditscaleError(f"projection file {path} not found")
    try:
        P = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a foreign or damaged file
        raise EditscaleError(f"{path} is not a torch tensor file (torch.save of the projections): {exc}") from exc
    if not isinstance(P, torch.Tensor):
        raise EditscaleError(f"{path} holds a {type(P).__name__}, expected the tensor of projections [n_layers, d, d]")
    if P.dim() == 2:
        P = P[None]
    if P.dim() != 3 or P.shape[1] != P.shape[2] or not P.is_floating_point():
        raise EditscaleError(f"{path}: expected a float tensor [n_layers, d, d], got {P.dtype} {tuple(P.shape)}")
    return P


def convert_projections(pt: str | Path, model_dir: str | Path, layers: list[int], stats_dir: str | Path, out_dir: str | Path,
                        threshold: float, rule: str = "svd32") -> list[dict[str, Any]]:
    """Write one projection HDF5 per layer (`out_dir/{module}.t{threshold}.h5`, the module being the
    MLP output matrix of the layer, as AlphaEdit edits it) from a `null_space_project.pt`. Each is
    tied to the stats file of its module in `stats_dir` (its sha256, as `editscale nullspace`
    records it), which must exist: convert the same model's layer statistics first. `rule` records
    how the file's P was made (AlphaEdit's and EasyEdit's: svd32), so a run with that
    projection_rule reads it."""
    from ..models.load import model_sha
    from ..models.registry import mlp_out_name, module_shapes
    from .mom2 import write_projection

    P = read_projection_pt(pt)
    if len(layers) != P.shape[0]:
        raise EditscaleError(f"{pt} holds {P.shape[0]} projections but {len(layers)} layers were named ({layers}): name the "
                             "layers in the order of the hparams' `layers` that made the file")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir))
    sha, pt_sha = model_sha(model_dir), sha256_file(pt)
    written = []
    for i, layer in enumerate(layers):
        module = mlp_out_name(cfg.model_type, int(layer))
        d_in = module_shapes(cfg, [module])[module][1]
        if P.shape[1] != d_in:
            raise EditscaleError(f"{pt}: projection {i} is {P.shape[1]} x {P.shape[1]} but the input of {module} in {model_dir} "
                                 f"has dimension {d_in}: the file is for another model")
        stats = Path(stats_dir) / f"{module}.h5"
        if not stats.exists():
            raise EditscaleError(f"{stats} not found: convert or compute the statistics of {module} first (the projection is tied to them)")
        Pi = P[i].double().numpy()
        out = Path(out_dir) / f"{module}.t{threshold}.h5"
        rank = int(round(float(Pi.trace())))
        write_projection(out, Pi, threshold=threshold, rank=rank, stats_sha256=sha256_file(stats), model_sha256=sha,
                         module=module, rule=rule)
        log.info("convert-projection: %s[%d] (%s, rank %d) -> %s", pt, i, module, rank, out)
        written.append({"out": str(out), "module": module, "rank": rank, "pt_sha256": pt_sha})
    return written
