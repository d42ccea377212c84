"""Retriever pretraining step: questions/s and peak memory, with and without gradient caching.

DPR's setting at BERT-base size (random weights, BertConfig() defaults): separate question and
passage encoders, b questions with one positive and one hard negative each (2b passages of
`--passage-len` tokens), questions of 32-64 tokens, InfoNCE over all 2b passages, AdamW step.

    python benchmarks/bench_retriever.py                          # b=128, both modes
    python benchmarks/bench_retriever.py --batch-size 16 --steps 1 --mode plain

Memory: on CPU, `LiveBytes` (a TorchDispatchMode) counts the bytes of live tensor storages:
the parameters, then every storage an op creates, released when the storage dies; its peak is
what an allocator without fragmentation would need. (torch's MemTracker refuses a module called
twice in one step, which gradient caching does chunk by chunk.) On CUDA,
torch.cuda.max_memory_allocated as well. Plain backprop keeps every sequence's activations
alive at once, so its memory grows with b; gradient caching keeps one chunk's, so it does not.

`--device meta` counts the same bytes without computing anything (tensors with shapes and no
data): how plain backprop at b=128 is measured on a machine whose RAM it would not fit.
`--check-meta B` first runs b=B on the CPU and on meta and prints both counts (equal to the
byte when the meta count is to be trusted). No time is reported on meta.

    python benchmarks/bench_retriever.py --device meta --mode plain --check-meta 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import BertConfig, BertModel

from rag_e2e.encoders import BiEncoder
from rag_e2e.losses import contrastive_backward, info_nce


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages: those registered with `add`, and every op's outputs."""

    def __init__(self):
        super().__init__()
        self._refs: dict[int, weakref.ref] = {}  # id -> weak reference to the storage
        self.current = self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self._refs and self._refs[key]() is st:
            return  # a view or an in-place result: the same storage
        n = st.nbytes()

        def free(_, key=key, n=n):
            self._refs.pop(key, None)
            self.current -= n

        self._refs[key] = weakref.ref(st, free)
        self.current += n
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def allow_meta_masks(passage_len: int) -> None:
    """transformers reads the attention mask's values to decide whether SDPA may skip it, which
    meta tensors cannot answer; answer as the CPU run does for this benchmark's batch
    (passages unpadded, questions padded). Only meta tensors take this path."""
    import transformers.masking_utils as mu

    original = mu._ignore_bidirectional_mask_sdpa

    def ignore(padding_mask, kv_length, local_attention_size=None):
        if padding_mask is not None and padding_mask.device.type == "meta":
            return padding_mask.shape[-1] == passage_len and local_attention_size is None
        return original(padding_mask, kv_length, local_attention_size)

    mu._ignore_bidirectional_mask_sdpa = ignore


def make_batch(b: int, hard: int, passage_len: int, q_min: int, q_max: int, vocab: int, device):
    """Random ids: questions (b, <=q_max) with lengths in [q_min, q_max], passages (b(1+h), passage_len)."""
    g = torch.Generator().manual_seed(0)
    q_len = torch.randint(q_min, q_max + 1, (b,), generator=g)
    q_ids = torch.randint(1000, vocab, (b, q_max), generator=g)
    q_mask = (torch.arange(q_max)[None] < q_len[:, None]).long()
    n = b * (1 + hard)
    d_ids = torch.randint(1000, vocab, (n, passage_len), generator=g)
    d_mask = torch.ones(n, passage_len, dtype=torch.long)
    return (q_ids.to(device), q_mask.to(device)), (d_ids.to(device), d_mask.to(device))


def one_step(encoder: BiEncoder, opt, queries, docs, chunk, tracker=None) -> int:
    """Forward, backward, AdamW step; returns the peak live bytes before the optimizer step."""
    b = queries[0].shape[0]
    if queries[0].device.type == "meta":  # info_nce's checks read values; the same sum, unchecked
        loss_of = lambda q, c: (torch.logsumexp(q @ c.T, 1) - (q * c[:b]).sum(1)).mean()
    else:
        loss_of = lambda q, c: info_nce(q, c, torch.arange(b, device=q.device)).mean()  # positive i at row i
    contrastive_backward(encoder.encode_queries, encoder.encode_docs, queries, docs, loss_of, chunk)
    peak = tracker.peak if tracker is not None else 0
    opt.step()
    opt.zero_grad(set_to_none=True)
    return peak


def run(mode: str, args, device) -> dict:
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=args.layers)  # BERT-base: 12 layers, d=768, 110M parameters
    with torch.device(device):  # on meta: shapes only
        encoder = BiEncoder(BertModel(cfg, add_pooling_layer=False), BertModel(cfg, add_pooling_layer=False))
    encoder.train()
    opt = torch.optim.AdamW(encoder.parameters(), lr=2e-5)
    queries, docs = make_batch(args.batch_size, args.hard_negatives, args.passage_len, args.query_min,
                               args.query_max, cfg.vocab_size, device)
    chunk = args.chunk if mode == "grad_cache" else None
    if device.type == "meta" and chunk is not None:
        raise SystemExit("--device meta counts plain backprop only (gradient caching reads lengths from the mask)")
    if device.type == "cuda":
        one_step(encoder, opt, queries, docs, chunk)  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tracker = None
    if device.type in ("cpu", "meta") and not args.no_tracker:
        tracker = LiveBytes()
        for p in encoder.parameters():
            tracker.add(p)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with tracker if tracker is not None else contextlib.nullcontext():
            peak_backward = one_step(encoder, opt, queries, docs, chunk, tracker)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    out = {"mode": mode, "device": str(device), "batch_questions": args.batch_size, "layers": args.layers,
           "passages": args.batch_size * (1 + args.hard_negatives), "passage_len": args.passage_len,
           "chunk": chunk, "threads": torch.get_num_threads()}
    if device.type != "meta":
        out.update(step_s=round(step_s, 2), questions_per_s=round(args.batch_size / step_s, 2))
    if tracker is not None:
        # forward + backward (activations, gradients) vs the whole step (+ AdamW's two moments)
        out["peak_backward_mib"] = round(peak_backward / 2**20, 1)
        out["peak_step_mib"] = round(tracker.peak / 2**20, 1)
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=128, help="questions per step")
    ap.add_argument("--hard-negatives", type=int, default=1)
    ap.add_argument("--passage-len", type=int, default=256)
    ap.add_argument("--query-min", type=int, default=32)
    ap.add_argument("--query-max", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=32, help="gradient-cache chunk (sequences per forward)")
    ap.add_argument("--mode", choices=["plain", "grad_cache", "both"], default="both")
    ap.add_argument("--steps", type=int, default=1, help="timed steps (the median is reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-tracker", action="store_true", help="CPU: time without the memory tracker's overhead")
    ap.add_argument("--layers", type=int, default=12, help="encoder layers (12 = BERT-base)")
    ap.add_argument("--check-meta", type=int, default=0, metavar="B",
                    help="with --device meta: first count b=B on the CPU and on meta, to show they agree")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    results = []
    if device.type == "meta":
        allow_meta_masks(args.passage_len)
    if device.type == "meta" and args.check_meta:
        small = argparse.Namespace(**{**vars(args), "batch_size": args.check_meta, "steps": 1})
        cpu, meta = run("plain", small, torch.device("cpu")), run("plain", small, device)
        print(json.dumps({"check": f"b={args.check_meta} plain, cpu vs meta",
                          "cpu_peak_step_mib": cpu["peak_step_mib"], "meta_peak_step_mib": meta["peak_step_mib"],
                          "equal": cpu["peak_step_mib"] == meta["peak_step_mib"]}), flush=True)
    for mode in (["plain", "grad_cache"] if args.mode == "both" else [args.mode]):
        res = run(mode, args, device)
        print(json.dumps(res), flush=True)
        results.append(res)
    return results


if __name__ == "__main__":
    main()
