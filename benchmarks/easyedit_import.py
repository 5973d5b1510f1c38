"""How many of EasyEdit's own hparams files `editscale hparams import-easyedit` imports: every
file under hparams/<ALG>/ of a zjunlp/EasyEdit checkout whose ALG is the EasyEdit name of an
editscale method (the registry's `easyedit`), converted in memory; each refused file with its
problems, and the keys dropped as "cannot map" (a key editscale does not know what to do with).

    python -m benchmarks.easyedit_import /path/to/EasyEdit [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def import_all(root: Path) -> dict:
    from editscale.edit.easyedit import convert
    from editscale.edit.methods import METHODS
    from editscale.io import EditscaleError

    names = {entry.easyedit: name for name, entry in METHODS.items() if entry.easyedit}
    files: dict[str, dict] = {}
    for alg_dir in sorted(p for p in (root / "hparams").iterdir() if p.is_dir() and p.name in names):
        for path in sorted(alg_dir.rglob("*.yaml")):
            rel = str(path.relative_to(root))
            try:
                conv = convert(path)
            except EditscaleError as exc:
                files[rel] = {"imported": False, "problems": str(exc).splitlines()[1:] or [str(exc)]}
                continue
            files[rel] = {"imported": True, "method": conv.method, "architecture": conv.architecture,
                          "cannot_map": sorted(k for k, why in conv.dropped.items() if why.startswith("cannot map"))}
    return {"root": str(root), "methods": names, "files": files,
            "imported": sum(f["imported"] for f in files.values()), "total": len(files)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("easyedit", type=Path, help="a zjunlp/EasyEdit checkout (its hparams/ folder is read)")
    ap.add_argument("--json", type=Path, default=None, help="write the per-file results here")
    args = ap.parse_args(argv)
    res = import_all(args.easyedit)
    for rel, f in res["files"].items():
        if not f["imported"]:
            print(f"REFUSED {rel}")
            for line in f["problems"]:
                print(f"    {line.strip()}")
        elif f["cannot_map"]:
            print(f"imported {rel}, cannot map: {f['cannot_map']}")
    print(f"{res['imported']} of {res['total']} files imported ({', '.join(sorted(res['methods']))})")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
