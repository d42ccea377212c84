"""Joint RAG training: query encoder + generator (+ document encoder in end2end mode).

    python -m rag_e2e.train_rag --config configs/debug_tiny.yaml [optim.lr=1e-4 rag.n_docs=10 ...]
    accelerate launch -m rag_e2e.train_rag --config configs/rag_sequence_nq.yaml     # GPUs, nodes

The loop is this file's `train` function, top to bottom: sample a batch, retrieve, marginal NLL,
backward, clip, step; every `rebuild.every` steps re-encode the corpus and swap the index;
every `eval_every` steps decode the dev subset; every `save_every` steps checkpoint.
Outputs in `out_dir`: config.yaml, train.log, tb/ (TensorBoard), checkpoints/, index/,
export/ (merged generator and encoders, plain transformers folders), metrics.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rag_e2e.config import load_config, save_config
from rag_e2e.pipeline import TrainConfig

log = logging.getLogger("rag_e2e.train_rag")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m rag_e2e.train_rag", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("--resume", action="store_true", help="continue the run in out_dir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing out_dir and start afresh")
    p.add_argument("overrides", nargs="*", help="dotted overrides: optim.lr=1e-4 rag.n_docs=10")
    return p.parse_args(argv)


def prepare_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to touch an existing run unless asked to resume or overwrite it."""
    if out.exists() and any(out.iterdir()):
        if resume:
            return
        if not overwrite:
            raise SystemExit(f"error: {out} already holds a run; pass --resume to continue it "
                             f"or --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def setup_logging(out: Path, main_process: bool) -> None:
    """Console (unless the host already set up logging) and <out>/train.log for the rag_e2e loggers."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pkg = logging.getLogger("rag_e2e")
    pkg.setLevel(logging.INFO if main_process else logging.WARNING)
    for h in [h for h in pkg.handlers if getattr(h, "_rag_e2e_run", False)]:
        pkg.removeHandler(h)
        h.close()
    if main_process:
        fh = logging.FileHandler(out / "train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh._rag_e2e_run = True
        pkg.addHandler(fh)


def batches(n: int, size: int, seed: int, epoch: int, position: int, rank: int = 0, world: int = 1):
    """Endless epochs of a seeded permutation; yields (epoch, position after, this process's rows)."""
    if n < size * world:
        raise ValueError(f"{n} training examples are fewer than one batch ({size} x {world} processes)")
    while True:
        perm = np.random.default_rng(seed + epoch).permutation(n)
        while position + size * world <= n:
            rows = perm[position: position + size * world][rank::world]
            position += size * world
            yield epoch, position, rows
        epoch, position = epoch + 1, 0


def param_groups(model, optim) -> list[dict]:
    ret = [p for p in model.retriever.parameters() if p.requires_grad]
    ids = {id(p) for p in ret}
    gen = [p for p in model.generator.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": gen, "lr": optim.lr}]
    if ret:
        groups.append({"params": ret, "lr": optim.retriever_lr})
    return groups


def grad_norm(params) -> float:
    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def evaluate_dev(model, comps, dev, cfg: TrainConfig) -> dict:
    from rag_e2e.evaluate import predict, score

    items = dev[: cfg.data.dev_subset] if cfg.data.dev_subset else dev
    records = predict(model, comps, items, cfg.decode, cfg.eval_batch_size, progress=False)
    return score(records)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    return train(cfg, resume=args.resume, overwrite=args.overwrite)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, stop_after: int = 0) -> dict:
    """Run (or resume) a training job; `stop_after` ends it early at that step (tests of resume)."""
    from accelerate import Accelerator
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from rag_e2e.checkpoint import find_checkpoint, load_training_state, save_checkpoint
    from rag_e2e.marginalize import doc_prior_entropy
    from rag_e2e.pipeline import build_components, encode_examples, make_batch, seed_everything
    from rag_e2e.qa_data import load_qa

    # cpu=True on a machine without CUDA: torchrun's processes then form a gloo group (MULTI_CPU)
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    out = Path(cfg.out_dir)
    if acc.is_main_process:
        prepare_out_dir(out, resume, overwrite)
    acc.wait_for_everyone()
    setup_logging(out, acc.is_main_process)
    ckpt = find_checkpoint(out) if resume else None
    if resume and ckpt is None:
        log.info("--resume: no checkpoint in %s yet, starting from step 0", out)
    if acc.is_main_process:
        save_config(cfg, out / "config.yaml")
    seed_everything(cfg.seed)
    t_start = time.time()
    comps = build_components(cfg, retriever_from=str(ckpt / "retriever") if ckpt else None,
                             generator_from=str(ckpt / "generator") if ckpt else None,
                             accelerator=acc, device=acc.device)
    train_set = load_qa(cfg.data.train)
    if cfg.data.max_train_examples:
        train_set = train_set[: cfg.data.max_train_examples]
    train_items = encode_examples(comps, cfg, train_set, cfg.data.answers)
    dev_items = encode_examples(comps, cfg, load_qa(cfg.data.dev)) if cfg.data.dev else []
    log.info("%d training examples, %d dev questions, %d passages, index %s (v%d)", len(train_items),
             len(dev_items), len(comps.store), comps.live.index.kind, comps.live.version)

    model = comps.model
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim), weight_decay=cfg.optim.weight_decay,
                                  fused=True)  # one kernel over all parameters, CPU and GPU
    scheduler = get_scheduler(cfg.optim.schedule, optimizer, cfg.optim.warmup_steps, cfg.optim.max_steps)
    state = {"step": 0, "epoch": 0, "position": 0, "best": None, "best_step": None, "bad_steps": 0}
    if ckpt is not None:
        state.update(load_training_state(ckpt, optimizer, scheduler))
        log.info("resumed from %s at step %d", ckpt, state["step"])
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    raw = acc.unwrap_model(model)
    writer = SummaryWriter(str(out / "tb")) if acc.is_main_process else None
    data = batches(len(train_items), cfg.optim.batch_size, cfg.seed, state["epoch"], state["position"],
                   acc.process_index, acc.num_processes)
    q_params = [p for p in raw.retriever.query_encoder.parameters() if p.requires_grad]
    history, dev_metrics, window = [], {}, []
    bar = tqdm(total=cfg.optim.max_steps, initial=state["step"], desc="training", unit=" step",
               disable=not acc.is_main_process or None)
    t_loop, seen = time.time(), 0
    model.train()
    while state["step"] < cfg.optim.max_steps:
        # ---- one optimizer step: grad_accum micro-batches -----------------------------------------
        losses, entropies, finite = [], [], True
        for micro in range(cfg.optim.grad_accum):
            epoch, position, rows = next(data)
            batch = make_batch([train_items[i] for i in rows], comps.ret_tok.pad_token_id)
            sync = acc.no_sync(model) if micro < cfg.optim.grad_accum - 1 else contextlib.nullcontext()
            with sync, acc.autocast():
                outp = model(batch)
                loss = outp.loss / cfg.optim.grad_accum
            finite = finite and bool(torch.isfinite(loss.detach()))
            if finite:
                acc.backward(loss)
            losses.append(float(outp.loss.detach()))
            entropies.append(float(doc_prior_entropy(outp.doc_scores.detach()).mean()))
            seen += len(rows)
        finite = bool(acc.gather(torch.tensor([float(finite)], device=acc.device)).min() > 0)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            state["bad_steps"] += 1
            log.warning("step %d: non-finite loss (%s); step skipped (%d in a row, stop at %d)", state["step"] + 1,
                        losses, state["bad_steps"], cfg.max_bad_steps)
            if state["bad_steps"] >= cfg.max_bad_steps:
                raise RuntimeError(f"stopping: {state['bad_steps']} consecutive non-finite losses at step "
                                   f"{state['step'] + 1}; lower optim.lr, use bf16 instead of fp16, or check the data")
            continue
        state["bad_steps"] = 0
        q_norm = grad_norm(q_params)
        if cfg.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.update(step=state["step"] + 1, epoch=epoch, position=position)
        step = state["step"]
        bar.update(1)
        loss_val = sum(losses) / len(losses)
        history.append(loss_val)
        window.append(loss_val)
        bar.set_postfix(loss=f"{loss_val:.3f}")

        # ---- index rebuild (end2end), logging, evaluation, checkpoints -------------------------------
        stats = raw.retrieval.maybe_rebuild(step, raw.retriever) if cfg.rebuild.every else None
        if writer is not None and (step % cfg.log_every == 0 or step == cfg.optim.max_steps):
            scalars = {"train/loss": sum(window) / len(window), "train/lr": scheduler.get_last_lr()[0],
                       "train/doc_prior_entropy": sum(entropies) / len(entropies),
                       "train/query_encoder_grad_norm": q_norm,
                       "train/questions_per_s": seen / max(time.time() - t_loop, 1e-9),
                       "index/staleness_steps": float(raw.retrieval.staleness(step)),
                       "index/version": float(raw.retrieval.version)}
            for k, v in scalars.items():
                writer.add_scalar(k, v, step)
            window = []
        if stats and writer is not None:
            for k, v in stats.items():
                writer.add_scalar(k, v, step)
        is_best = False
        at_end = step == cfg.optim.max_steps or step == stop_after
        if dev_items and ((cfg.eval_every and step % cfg.eval_every == 0) or at_end):
            dev_metrics = evaluate_dev(raw, comps, dev_items, cfg)
            log.info("step %d dev: %s", step, {k: round(v, 2) if isinstance(v, float) else v
                                               for k, v in dev_metrics.items()})
            if writer is not None:
                for k, v in dev_metrics.items():
                    if isinstance(v, (int, float)):
                        writer.add_scalar(f"dev/{k}", v, step)
            val = dev_metrics.get(cfg.best_metric)
            if val is not None and (state["best"] is None or val > state["best"]):
                state.update(best=val, best_step=step)
                is_best = True
        if acc.is_main_process and ((cfg.save_every and step % cfg.save_every == 0) or at_end):
            save_checkpoint(out, step, raw, comps.ret_tok, comps.gen_tok, optimizer, scheduler,
                            {**state, "dev": dev_metrics, "index_version": raw.retrieval.version}, cfg,
                            cfg.keep_last, is_best)
        acc.wait_for_everyone()
        if step == stop_after:
            break
    bar.close()
    wall = time.time() - t_start
    metrics = {**dev_metrics, "steps": state["step"], "final_loss": history[-1] if history else None,
               "best_" + cfg.best_metric: state["best"], "best_step": state["best_step"],
               "train_questions_per_s": seen / max(time.time() - t_loop, 1e-9), "wall_s": wall,
               "index_version": raw.retrieval.version, "losses": history}
    if acc.is_main_process:
        if cfg.export and state["step"] == cfg.optim.max_steps:
            export(raw, comps, out / "export")
        _write_json(out / "metrics.json", metrics)
        log.info("done: %d steps in %.0fs; metrics in %s", state["step"], wall, out / "metrics.json")
    if writer is not None:
        writer.close()
    return metrics


def export(model, comps, out: Path) -> None:
    """Merged generator and the encoders as plain transformers folders (loadable without rag_e2e)."""
    import copy

    from rag_e2e.generator import merged_generator

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    gen = merged_generator(copy.deepcopy(model.generator))
    gen.save_pretrained(tmp / "generator")
    comps.gen_tok.save_pretrained(tmp / "generator")
    model.retriever.query_encoder.save_pretrained(tmp / "query_encoder")
    comps.ret_tok.save_pretrained(tmp / "query_encoder")
    if not model.retriever.shared:
        model.retriever.doc_encoder.save_pretrained(tmp / "doc_encoder")
        comps.ret_tok.save_pretrained(tmp / "doc_encoder")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("exported merged generator and encoders to %s", out)


if __name__ == "__main__":
    main(sys.argv[1:])
