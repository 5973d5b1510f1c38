"""`editscale download`: fetch one file over HTTP(S) (or file://) into data/downloads/, atomically.

The workflow's `download` rule (rules/data.smk) calls it for every dataset with a `url` and for the
well-known files below that a config refers to by their data/downloads/ path (the study's sample
order index). The file appears only when complete (temp file beside the target, fsync, rename), and
when a sha256 is known it must match, so a truncated or changed download never looks finished.

Offline machines: the error names the URL and the target path; fetch the file elsewhere and put it
at that path (Snakemake then treats it as present and does not run the rule).
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from .. import __version__
from ..io import EditscaleError, atomic_path
from .readers import COUNTERFACT_URLS

log = logging.getLogger(__name__)

# The forgetting study's 10 random CounterFact orders with unique subjects (20,391 case ids each),
# published as counterfact_sampled_unique_10_20391.json in its repository; pinned to a commit.
PAPER_SAMPLES_URL = (
    "https://raw.githubusercontent.com/scalable-model-editing/gradual-catastrophic-forgetting/"
    "88a07d7f7517a02024d53e14f17d276cf8542943/counterfact_sampled_unique_10_20391.json"
)

# Files a config may name under data/downloads/ without giving a URL: name -> (url, sha256 or None).
KNOWN_FILES: dict[str, tuple[str, str | None]] = {
    "paper_samples_unique_10_20391.json": (
        PAPER_SAMPLES_URL,
        "16c4b85938afdf15b54ad6f163d17013e9dc2043518c8e4169068dc64f8cffdc",
    ),
    "counterfact.json": (COUNTERFACT_URLS["counterfact"], None),
    "multi_counterfact.json": (COUNTERFACT_URLS["multi_counterfact"], None),
}
DOWNLOAD_DIR = "data/downloads"
CHUNK = 1 << 20


def known_sha256(url: str) -> str | None:
    """The pinned sha256 of a well-known URL, if any."""
    for known_url, sha in KNOWN_FILES.values():
        if known_url == url:
            return sha
    return None


def download(url: str, out: str | Path, sha256: str | None = None, timeout: float = 60.0) -> str:
    """Fetch `url` to `out` atomically; return the file's sha256. EditscaleError naming the URL on
    any network or checksum failure (nothing is left at `out` then)."""
    out = Path(out)
    if not url or "://" not in url:
        raise EditscaleError(f"download: {url!r} is not a URL (expected https://..., http://... or file://...)")
    expected = sha256.lower() if sha256 else None
    t0 = time.time()
    h = hashlib.sha256()
    n = 0
    request = urllib.request.Request(url, headers={"User-Agent": f"editscale/{__version__}"})
    hint = f"If this machine is offline, fetch {url} elsewhere and place it at {out}."
    try:
        with atomic_path(out) as tmp:
            with urllib.request.urlopen(request, timeout=timeout) as resp, open(tmp, "wb") as fh:
                total = resp.headers.get("Content-Length")
                log.info("downloading %s -> %s%s", url, out, f" ({int(total) / 1e6:.1f} MB)" if total else "")
                while block := resp.read(CHUNK):
                    fh.write(block)
                    h.update(block)
                    n += len(block)
                if total is not None and n != int(total):
                    raise EditscaleError(f"download of {url} is incomplete: {n} of {total} bytes. {hint}")
            digest = h.hexdigest()
            if expected and digest != expected:
                raise EditscaleError(
                    f"download of {url} has sha256 {digest}, expected {expected}: the file changed upstream or was "
                    f"corrupted; nothing was written to {out}"
                )
    except urllib.error.HTTPError as exc:
        raise EditscaleError(f"cannot download {url}: HTTP {exc.code} {exc.reason}. {hint}") from exc
    except urllib.error.URLError as exc:
        raise EditscaleError(f"cannot download {url}: {exc.reason} (network unreachable or offline?). {hint}") from exc
    except (socket.timeout, TimeoutError) as exc:
        raise EditscaleError(f"cannot download {url}: timed out after {timeout:.0f} s. {hint}") from exc
    except OSError as exc:
        raise EditscaleError(f"cannot download {url} to {out}: {exc}. {hint}") from exc
    log.info("downloaded %s: %d bytes in %.1f s, sha256 %s", out, n, time.time() - t0, digest)
    return digest
