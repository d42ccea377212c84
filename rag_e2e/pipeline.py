"""The run config of joint training and evaluation, and building a RagModel from it.

Shared by `train_rag` (training), `evaluate` (decoding a checkpoint) and the demo: one place
knows how passages, tokenizers, encoders, index and generator fit together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

from rag_e2e.decoding import DecodeConfig
from rag_e2e.encoders import BiEncoder, RetrieverConfig, load_retriever
from rag_e2e.generator import GeneratorConfig, load_generator
from rag_e2e.index import encoder_fingerprint
from rag_e2e.inputs import pad, pair_template
from rag_e2e.model import RagBatch, RagConfig, RagModel
from rag_e2e.passages import PassageStore, TokenizedPassages, read_passages, tokenize_passages
from rag_e2e.qa_data import QAExample
from rag_e2e.rebuild import LiveIndex, RebuildConfig

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    passages: str = ""  # psgs_w100.tsv (DPR) or passages .jsonl
    train: str = ""  # QA spec: *.qa.csv, *.jsonl, biencoder-*.json, or a datasets name (nq_open:train)
    dev: str = ""  # same forms; evaluated every `eval_every` steps on `dev_subset` questions
    dev_subset: int = 200  # questions decoded at each periodic evaluation (0 = all)
    max_train_examples: int = 0  # 0 = all
    answers: Literal["first", "all"] = "first"  # train on the first gold answer, or one example per answer
    cache_dir: str = ""  # tokenized passages and the passage table ("" = <out_dir>/cache)


@dataclass
class OptimConfig:
    lr: float = 3e-5  # generator (paper: 3e-5, Adam)
    retriever_lr: float = 1e-5  # query (and document) encoder
    weight_decay: float = 0.0
    batch_size: int = 8  # questions per optimizer step and process, before accumulation
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    warmup_steps: int = 0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    out_dir: str = "runs/rag"
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    index_dir: str = ""  # a prebuilt index (index_build); "" = encode the corpus and build one at start
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    rag: RagConfig = field(default_factory=RagConfig)
    rebuild: RebuildConfig = field(default_factory=RebuildConfig)  # index kind, periodic rebuilds
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    log_every: int = 10
    eval_every: int = 0  # steps between dev evaluations (0 = at the end only)
    save_every: int = 0  # steps between checkpoints (0 = at the end only)
    keep_last: int = 2  # checkpoints kept (the best one is always kept too)
    best_metric: str = "em"  # dev metric that picks the best checkpoint
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    eval_batch_size: int = 16
    export: bool = True  # write merged generator + encoders in transformers format at the end


@dataclass
class Components:
    """Everything a RagModel is made of, kept together for training and evaluation."""

    store: PassageStore
    ret_tok: object
    gen_tok: object
    gen_passages: TokenizedPassages
    doc_passages: TokenizedPassages
    live: LiveIndex
    model: RagModel


def load_store(cfg: TrainConfig) -> PassageStore:
    return read_passages(cfg.data.passages, cache_dir=Path(cache_dir(cfg)) / "passages")


def cache_dir(cfg: TrainConfig) -> str:
    return cfg.data.cache_dir or str(Path(cfg.out_dir) / "cache")


def build_components(cfg: TrainConfig, retriever_from: Optional[str] = None, generator_from: Optional[str] = None,
                     index_dir: Optional[str] = None, accelerator=None, store: Optional[PassageStore] = None,
                     device: str | torch.device = "cpu") -> Components:
    """Passages -> tokenized stores -> encoders, generator -> live index -> RagModel.

    retriever_from / generator_from: a checkpoint's `retriever` / `generator` folders, read instead
    of the config's starting points. index_dir: serve that index (checked against passages and encoder).
    """
    store = store or load_store(cfg)
    rcfg = cfg.retriever if retriever_from is None else replace(cfg.retriever, query_model=retriever_from)
    retriever, ret_tok = load_retriever(rcfg)
    generator, gen_tok = load_checkpoint_generator(cfg.generator, generator_from)
    retriever.to(device)
    generator.to(device)
    cache = Path(cache_dir(cfg))
    gen_passages = tokenize_passages(store, gen_tok, "generator", cfg.generator.max_passage_length, cache_dir=cache)
    doc_passages = tokenize_passages(store, ret_tok, "retriever", cfg.retriever.max_passage_length, cache_dir=cache)
    live = serve_index(cfg, retriever, doc_passages, ret_tok.pad_token_id, index_dir or cfg.index_dir, accelerator)
    model = RagModel(retriever, generator, live, cfg.rag, gen_passages, pair_template(gen_tok), gen_tok.pad_token_id,
                     cfg.generator.max_source_length, doc_passages, ret_tok.pad_token_id)
    return Components(store, ret_tok, gen_tok, gen_passages, doc_passages, live, model)


def load_checkpoint_generator(gcfg: GeneratorConfig, generator_from: Optional[str]):
    """The generator of a config, or of a checkpoint folder (a peft adapter or a full model)."""
    if generator_from is None:
        return load_generator(gcfg)
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(generator_from)
    tok = AutoTokenizer.from_pretrained(path)
    if (path / "adapter_config.json").is_file():
        import peft

        base, _ = load_generator(replace(gcfg, peft="none"), tokenizer=tok)
        return peft.PeftModel.from_pretrained(base, path, is_trainable=True), tok
    return AutoModelForSeq2SeqLM.from_pretrained(path), tok


def serve_index(cfg: TrainConfig, retriever: BiEncoder, doc_passages: TokenizedPassages, pad_id: int,
                index_dir: str, accelerator=None) -> LiveIndex:
    """A prebuilt index (paper mode), the run's own latest version (resume), or a fresh build."""
    work = Path(cfg.out_dir) / "index"
    live = LiveIndex.resume(work, doc_passages, pad_id, cfg.rebuild, accelerator=accelerator)
    if live is not None:
        log.info("serving index version %d from %s", live.version, work)
        return live
    if index_dir:
        log.info("serving prebuilt index %s", index_dir)
        expect = encoder_fingerprint(retriever.doc_encoder) if cfg.rag.mode == "end2end" else None
        return LiveIndex.load(index_dir, doc_passages, pad_id, cfg.rebuild, work, expect_encoder=expect,
                              accelerator=accelerator)
    log.info("encoding %d passages with the document encoder to build the index (%s)", len(doc_passages), work)
    return LiveIndex.build(retriever, doc_passages, pad_id, cfg.rebuild, work, accelerator=accelerator)


@dataclass
class EncodedQA:
    """A QA example tokenized once: query-encoder ids, generator question ids, generator labels."""

    example: QAExample
    query_ids: list
    question_ids: list
    label_ids: list


def encode_examples(comps: Components, cfg: TrainConfig, examples: list[QAExample],
                    answers: str = "first") -> list[EncodedQA]:
    """Tokenize questions and answers once. answers="all": one training example per gold answer."""
    for ex in examples:
        if not ex.question.strip():
            raise ValueError(f"question {ex.qid!r} is empty")
        if not ex.answers:
            raise ValueError(f"question {ex.qid!r} ({ex.question!r}) has no answer")
    pairs = [(ex, a) for ex in examples for a in (ex.answers if answers == "all" else ex.answers[:1])]
    qs = [ex.question for ex, _ in pairs]
    query = comps.ret_tok(qs, truncation=True, max_length=cfg.retriever.max_query_length)["input_ids"]
    gq = comps.gen_tok(qs, add_special_tokens=False, truncation=True,
                       max_length=cfg.generator.max_question_length)["input_ids"]
    labels = comps.gen_tok(text_target=[a for _, a in pairs], truncation=True,
                           max_length=cfg.generator.max_target_length)["input_ids"]
    return [EncodedQA(ex, q, g, lab) for (ex, _), q, g, lab in zip(pairs, query, gq, labels)]


def make_batch(items: list[EncodedQA], query_pad_id: int, with_labels: bool = True) -> RagBatch:
    """Pad pre-tokenized examples into a RagBatch (dynamic padding; no string work)."""
    qi, qm = pad([x.query_ids for x in items], query_pad_id)
    labels = None
    if with_labels:
        ids, mask = pad([x.label_ids for x in items], 0)
        labels = ids.masked_fill(mask == 0, -100)  # (b, t)
    return RagBatch(qi, qm, [x.question_ids for x in items], labels)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
