"""Build a FAISS index over the embeddings written by `index_build.encode`.

    python -m index_build.build --config configs/index_nq.yaml index.kind=hnsw
    python -m index_build.build out_dir=runs/index index.kind=ivfpq index.nlist=16384 index.nprobe=64

Reads out_dir/embeddings.npy (memory-mapped) and embeddings.json, checks them against
each other before anything is written, and writes out_dir/index-<kind>/ (index.faiss,
meta.json with the corpus and encoder fingerprints, the step and the parameters) through a
temporary folder, so a failed build leaves any earlier index of that kind untouched.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Optional

from index_build.encode import parse_args, update_metrics
from rag_e2e.index import IndexError_, build_index, index_params, load_embeddings, publish_dir

log = logging.getLogger("index_build.build")


def read_manifest(out_dir: Path) -> dict:
    path = out_dir / "embeddings.json"
    if not path.is_file():
        raise IndexError_(f"{path} not found: run `python -m index_build.encode` first (or let it finish)")
    manifest = json.loads(path.read_text())
    for key in ("count", "dim", "passages", "encoder"):
        if key not in manifest:
            raise IndexError_(f"{path}: missing key {key!r}")
    return manifest


def index_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name != "meta.json")


def main(argv: Optional[list[str]] = None) -> dict:
    cfg = parse_args(argv, "Build a FAISS index (flat | hnsw | ivfpq | sq8) over encoded passages.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out_dir = Path(cfg.out_dir)
    manifest = read_manifest(out_dir)
    emb = load_embeddings(out_dir / "embeddings.npy", expect_count=manifest["count"], expect_dim=manifest["dim"])
    kind = cfg.index.kind
    t0 = time.time()
    index = build_index(emb, kind, **index_params(cfg.index))
    build_s = time.time() - t0
    index.with_provenance(passages=manifest["passages"], encoder=manifest["encoder"], step=cfg.step)
    final = out_dir / f"index-{kind}"
    tmp = out_dir / f"index-{kind}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed build
    index.save(tmp)  # vectors are referenced as ../embeddings.npy: valid from tmp and from final alike
    publish_dir(tmp, final)
    result = {"kind": kind, "passages": index.ntotal, "dim": index.dim, "build_s": round(build_s, 2),
              "bytes_per_passage": round(index_bytes(final) / index.ntotal, 1), "params": index.params}
    update_metrics(out_dir, f"index-{kind}", result)
    log.info("wrote %s: %d passages, %.1f bytes each, built in %.1fs", final, index.ntotal,
             result["bytes_per_passage"], build_s)
    return result


if __name__ == "__main__":
    main()
