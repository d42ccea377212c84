"""Encode a passages file into fp16 embeddings on disk (sharded, resumable, multi-process).

    python -m index_build.encode --config configs/index_nq.yaml
    accelerate launch --num_processes 8 -m index_build.encode --config configs/index_nq.yaml   # 8 GPUs
    python -m index_build.encode passages=psgs_w100.tsv out_dir=runs/index retriever.query_model=facebook/...

Writes into out_dir: `shards/` while running (kept on a kill: the next run skips finished
shards), then `embeddings.npy` (fp16 (n, d), row i = store row i), `ids.npy` (passage ids in
store order), `embeddings.json` (corpus and encoder fingerprints), `metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from rag_e2e.config import load_config, save_config
from rag_e2e.embed import EncodeConfig, encode_shards, merge_shards, missing_shards, run_manifest
from rag_e2e.encoders import RetrieverConfig, load_retriever
from rag_e2e.index import IndexConfig
from rag_e2e.passages import TokenizedPassages, read_passages, tokenize_passages

log = logging.getLogger("index_build.encode")


@dataclass
class IndexBuildConfig:
    passages: str = ""  # DPR psgs_w100.tsv (id, text, title) or JSONL ({"id", "title", "text"})
    out_dir: str = "runs/index"  # embeddings.npy, ids.npy and index-<kind>/ go here
    cache_dir: str = ""  # Arrow table + tokenized passages; "" = out_dir/cache
    step: int = 0  # training step of the encoder, recorded in the index metadata
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)  # the document encoder used
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    index: IndexConfig = field(default_factory=IndexConfig)


def parse_args(argv: Optional[list[str]], description: str) -> IndexBuildConfig:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help="YAML config (IndexBuildConfig: passages, out_dir, retriever, encode, index)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. encode.batch_size=256 index.kind=hnsw")
    args = ap.parse_args(argv)
    return load_config(IndexBuildConfig, args.config, args.overrides)


def update_metrics(out_dir: Path, key: str, values: dict) -> None:
    """Merge one stage's figures into out_dir/metrics.json (temporary name, then rename)."""
    path = out_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.is_file() else {}
    metrics[key] = values
    tmp = path.with_name(f"metrics.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, path)


def _prepare_corpus(cfg: IndexBuildConfig, tokenizer, out_dir: Path) -> None:
    """Main process: read + validate + tokenize once; record where the tokens are for the others."""
    if not cfg.passages:
        raise ValueError("passages is empty: give the passages file (passages=path/to/psgs_w100.tsv)")
    cache = Path(cfg.cache_dir or out_dir / "cache")
    store = read_passages(cfg.passages, cache_dir=cache)
    tp = tokenize_passages(store, tokenizer, "retriever", cfg.retriever.max_passage_length, cache_dir=cache)
    np.save(out_dir / "ids.tmp.npy", np.asarray(store.ids, dtype=str))
    os.replace(out_dir / "ids.tmp.npy", out_dir / "ids.npy")
    corpus = {"tokens": str(Path(tp.tokens.filename).parent), "passages": store.fingerprint,
              "count": len(store), "source": str(cfg.passages)}
    (out_dir / "corpus.json.tmp").write_text(json.dumps(corpus, indent=2))
    os.replace(out_dir / "corpus.json.tmp", out_dir / "corpus.json")


def _load_corpus(out_dir: Path) -> TokenizedPassages:
    corpus = json.loads((out_dir / "corpus.json").read_text())
    tp = TokenizedPassages.load(corpus["tokens"])
    if tp.meta.get("passages") != corpus["passages"] or len(tp) != corpus["count"]:
        raise ValueError(f"{corpus['tokens']} does not hold the tokens of {corpus['source']}: delete it and rerun")
    return tp


def _already_done(out_dir: Path, manifest: dict) -> bool:
    path = out_dir / "embeddings.json"
    return path.is_file() and (out_dir / "embeddings.npy").is_file() and json.loads(path.read_text()) == manifest


def main(argv: Optional[list[str]] = None) -> dict:
    cfg = parse_args(argv, "Encode a passages file into fp16 embeddings (sharded, resumable).")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch
    from accelerate import Accelerator

    # cpu=True lets torchrun/mpirun processes on a GPU-less machine form a gloo group
    acc = Accelerator(cpu=not torch.cuda.is_available())
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder, tokenizer = load_retriever(cfg.retriever)
    if acc.is_main_process:
        _prepare_corpus(cfg, tokenizer, out_dir)
        save_config(cfg, out_dir / "encode_config.yaml")
    acc.wait_for_everyone()
    tp = _load_corpus(out_dir)
    encoder.to(acc.device)
    manifest = run_manifest(encoder, tp, cfg.encode.shard_size)
    if _already_done(out_dir, manifest):
        log.info("%s already holds these embeddings: nothing to do", out_dir / "embeddings.npy")
        return {"passages": len(tp), "encoded": 0}
    t0 = time.time()
    done = encode_shards(encoder, tp, tokenizer.pad_token_id, out_dir, cfg.encode,
                         rank=acc.process_index, world_size=acc.num_processes)
    seconds = time.time() - t0
    acc.wait_for_everyone()
    left = missing_shards(out_dir, len(tp), cfg.encode.shard_size)
    result = {"passages": len(tp), "shards_this_process": len(done), "shards_left": len(left),
              "seconds": round(seconds, 2)}
    if acc.is_main_process:
        if left:
            log.info("%d shards left (max_shards=%s): run the same command again to resume", len(left),
                     cfg.encode.max_shards)
        else:
            merge_shards(out_dir, keep_shards=cfg.encode.keep_shards)
            update_metrics(out_dir, "encode", {**result, "processes": acc.num_processes})
            log.info("wrote %s", out_dir / "embeddings.npy")
    acc.wait_for_everyone()
    return result


if __name__ == "__main__":
    main()
