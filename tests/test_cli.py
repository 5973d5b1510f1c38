"""The `editscale` command itself: what a job pays before its verb runs.

Every workflow job is one `editscale` process, and importing torch + transformers is most of a small
job's CPU time (about 1.3 s of a 1.6 s `metric-config` job on the 2-core VM). Building the parser
must therefore import no torch, so that the verbs that never touch a tensor (metric-config, audit,
the report's) do not pay for it, and `--threads` must still reach torch in the verbs that do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys
from editscale.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


def _editscale_in_fresh_process(*argv: str, tmp_path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_a_verb_without_tensors_imports_no_torch(tmp_path):
    from editscale.layout import metric_config_path

    out = tmp_path / metric_config_path("perplexity", {"batch_size": 8, "ignore_id": None}).name
    seen = _editscale_in_fresh_process("--threads", "1", "metric-config", "--metric", "perplexity",
                                       "--params-json", '{"batch_size": 8, "ignore_id": null}', "--out", str(out), tmp_path=tmp_path)
    assert seen == {"rc": 0, "torch": False, "transformers": False}
    assert json.loads(out.read_text())["batch_size"] == 8


def test_threads_reach_torch_imported_after_the_flag(tmp_path):
    """doctor imports torch inside its verb, after `--threads` was read; torch runs with the flag's
    count, not the environment's OMP_NUM_THREADS=2."""
    res = subprocess.run([sys.executable, "-m", "editscale.cli", "--threads", "1", "doctor", "--no-bench", "--json"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"}, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["machine"]["torch_threads"] == 1
