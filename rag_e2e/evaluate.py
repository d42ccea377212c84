"""Evaluation: decode, score EM / F1 / retrieval recall, write predictions with provenance.

    python -m rag_e2e.evaluate --checkpoint runs/nq/checkpoints/best --data nq-test.qa.csv \
        --out runs/nq/eval-test [--index path/to/index] [decode.mode=rag_sequence_thorough decode.num_beams=4 ...]

Writes <out>/predictions.jsonl (per question: prediction, gold answers, EM/F1, and the retrieved
passages with id, title, prior p(z|x), posterior p(z|x,y_hat) and whether they hold an answer)
and <out>/metrics.json (em, f1, recall@K in percent, counts, decoder and index settings, step).
Predictions are appended as they are made; `--resume` continues a stopped run where it ended.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rag_e2e.decoding import DecodeConfig, generate
from rag_e2e.marginalize import doc_posterior
from rag_e2e.metrics import exact_match, f1, has_answer, retrieval_recall
from rag_e2e.pipeline import EncodedQA, make_batch

log = logging.getLogger(__name__)
RECALL_KS = (1, 5, 20, 100)


def _posteriors(model, batch, doc_ids, doc_scores, sequences, gen_tok) -> torch.Tensor:
    """p(z|x,y_hat) of the decoded answers: one teacher-forced pass over the b*k contexts. (b, k)"""
    seqs = sequences.clone()
    seqs[seqs == gen_tok.pad_token_id] = -100
    if (seqs == -100).all(dim=1).any():  # an empty prediction: score its eos alone
        seqs[:, 0] = torch.where((seqs == -100).all(1), gen_tok.eos_token_id, seqs[:, 0])
    batch.labels = seqs
    out = model(batch, doc_ids=doc_ids, return_logits=True)
    return doc_posterior(out.logits, doc_scores, seqs.to(out.logits.device))


@torch.no_grad()
def predict(model, comps, items: list[EncodedQA], decode: DecodeConfig, batch_size: int = 16,
            recall_k: int = 100, progress: bool = True, on_batch=None) -> list[dict]:
    """Retrieve, decode and record provenance for `items`; returns one dict per question."""
    model.eval()
    k = model.cfg.n_docs
    depth = min(max(recall_k, k), len(comps.store))
    records = []
    bar = tqdm(range(0, len(items), batch_size), desc="decoding", unit=" batch", disable=not progress or None)
    for start in bar:
        chunk = items[start: start + batch_size]
        batch = make_batch(chunk, comps.ret_tok.pad_token_id, with_labels=False)
        scores, ids = model.retrieve(batch, k=depth)  # (b, depth) best first
        scores, top = scores[:, :k], ids[:, :k]
        ctx, mask = model.contexts(batch, top, scores.device)
        out = generate(model.generator, ctx, mask, scores, k, cfg=decode)
        post = _posteriors(model, batch, top, scores, out.sequences, comps.gen_tok)
        texts = comps.gen_tok.batch_decode(out.sequences, skip_special_tokens=True)
        prior = scores.softmax(-1)
        new = [_record(item, text.strip(), ids[i], prior[i], post[i], comps, k) for i, (item, text) in
               enumerate(zip(chunk, texts))]
        records.extend(new)
        if on_batch is not None:
            on_batch(new)
    model.train()
    return records


def _record(item: EncodedQA, prediction: str, ids, prior, post, comps, k: int) -> dict:
    """One prediction with provenance. A retrieval hit is a gold passage when the question names
    one that is in the corpus (recall_match "gold"), else a passage containing an answer (DPR)."""
    ex = item.example
    answered = [has_answer(comps.store[int(z)]["text"], ex.answers) for z in ids]
    gold = comps.store.rows_of(ex.gold_ids())
    hits = [int(z) in gold for z in ids] if gold else answered
    passages = [{"id": comps.store[int(z)]["id"], "title": comps.store[int(z)]["title"],
                 "prior": round(float(prior[j]), 6), "posterior": round(float(post[j]), 6),
                 "has_answer": answered[j], **({"gold": hits[j]} if gold else {})} for j, z in enumerate(ids[:k])]
    return {"qid": ex.qid, "question": ex.question, "answers": ex.answers, "prediction": prediction,
            "em": exact_match(prediction, ex.answers), "f1": f1(prediction, ex.answers),
            "recall_match": "gold" if gold else "answer", "hits": hits, "passages": passages}


def score(records: list[dict], ks=RECALL_KS) -> dict:
    """EM, F1 (percent, max over gold answers) and recall@K (percent) of prediction records."""
    n = len(records)
    if n == 0:
        raise ValueError("no predictions to score")
    out = {"em": 100.0 * sum(r["em"] for r in records) / n, "f1": 100.0 * sum(r["f1"] for r in records) / n,
           "count": n}
    out.update(retrieval_recall([r["hits"] for r in records], ks))
    matches = sorted({r.get("recall_match", "answer") for r in records})
    out["recall_match"] = matches[0] if len(matches) == 1 else "mixed"
    return out


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m rag_e2e.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (its best, else latest)")
    p.add_argument("--data", required=True, help="QA spec: *.qa.csv, *.jsonl, biencoder json, or nq_open:validation")
    p.add_argument("--out", required=True, help="output folder for metrics.json and predictions.jsonl")
    p.add_argument("--index", default="", help="serve this index instead of the run's own (swap the knowledge)")
    p.add_argument("--passages", default="", help="passages file of --index (default: the run's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="evaluate the first N questions only")
    p.add_argument("--resume", action="store_true", help="continue predictions.jsonl.partial in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing evaluation in --out")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. decode.num_beams=4 rag.n_docs=10")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from rag_e2e.checkpoint import find_checkpoint
    from rag_e2e.config import load_config
    from rag_e2e.pipeline import TrainConfig, build_components, encode_examples
    from rag_e2e.qa_data import load_qa

    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ckpt = find_checkpoint(args.checkpoint, "best") or find_checkpoint(args.checkpoint, "latest")
    if ckpt is None:
        raise SystemExit(f"error: no checkpoint found at {args.checkpoint}")
    out = Path(args.out)
    if (out / "metrics.json").exists() and not args.overwrite:
        raise SystemExit(f"error: {out}/metrics.json exists; pass --overwrite to replace it")
    examples = load_qa(args.data)  # a malformed row fails here, before any model work
    if args.limit:
        examples = examples[: args.limit]
    overrides = list(args.overrides) + ([f"data.passages={args.passages}"] if args.passages else [])
    cfg = load_config(TrainConfig, ckpt / "config.yaml", overrides)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    comps = build_components(cfg, retriever_from=str(ckpt / "retriever"), generator_from=str(ckpt / "generator"),
                             index_dir=args.index or None, device=device)
    out.mkdir(parents=True, exist_ok=True)
    records = _run(comps, cfg, encode_examples(comps, cfg, examples), out, args)
    metrics = score(records)
    step = json.loads((ckpt / "trainer_state.json").read_text()).get("step")
    metrics.update({"checkpoint": str(ckpt), "step": step, "data": args.data, "decode": asdict(cfg.decode),
                    "n_docs": cfg.rag.n_docs, "index": args.index or "run", "index_kind": comps.live.index.kind,
                    "index_params": comps.live.index.params})
    _finish(out, metrics)
    print(json.dumps({k: metrics[k] for k in metrics if k in ("em", "f1", "count") or k.startswith("recall@")}))
    return metrics


def _run(comps, cfg, items, out: Path, args) -> list[dict]:
    partial = out / "predictions.jsonl.partial"
    done: list[dict] = []
    if partial.exists() and not args.resume:
        raise SystemExit(f"error: {partial} exists from a stopped run: --resume to continue it, or remove it")
    if partial.exists():
        with open(partial) as f:
            done = [json.loads(line) for line in f if line.strip()]
        log.info("resuming: %d of %d questions already predicted in %s", len(done), len(items), partial)
    seen = {r["qid"] for r in done}
    todo = [x for x in items if x.example.qid not in seen]
    with open(partial, "a") as f:
        def write(new):
            for r in new:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
        t0 = time.time()
        done += predict(comps.model, comps, todo, cfg.decode, args.batch_size, on_batch=write)
    log.info("decoded %d questions in %.1fs", len(todo), time.time() - t0)
    return done


def _finish(out: Path, metrics: dict) -> None:
    os.replace(out / "predictions.jsonl.partial", out / "predictions.jsonl")
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=2))
    os.replace(tmp, out / "metrics.json")
    log.info("wrote %s and %s", out / "predictions.jsonl", out / "metrics.json")


if __name__ == "__main__":
    main(sys.argv[1:])
