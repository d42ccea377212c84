"""Peak memory of one full training step of configs/rag_16gb.yaml at paper model sizes.

BART-large and BERT-base built from their configs with random weights (no download), k, batch,
lengths, LoRA, bf16 autocast and gradient checkpointing as the config says; one step =
retrieval + forward + backward + optimizer step. Full fine-tuning of the generator beside it.
On CPU the peak is counted by MemTracker (torch.distributed._tools.mem_tracker: bytes of live
tensors by kind), with the optimizer state already allocated as in any step after the first;
on a GPU, torch.cuda.max_memory_allocated as well (after a warm-up step).

    python benchmarks/bench_memory.py [--peft both|lora|none] [--dtype bf16|fp32]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def build(cfg, peft: str, device):
    from transformers import BartConfig, BartForConditionalGeneration, BertConfig, BertModel

    from rag_e2e.encoders import BiEncoder
    from rag_e2e.generator import wrap_peft
    from rag_e2e.index import build_index
    from rag_e2e.inputs import PairTemplate
    from rag_e2e.model import RagModel, StaticRetrieval
    from rag_e2e.passages import TokenizedPassages

    torch.manual_seed(0)
    bart = BartForConditionalGeneration(BartConfig(  # bart-large's shape
        vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
        decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096, max_position_embeddings=1024))
    if cfg.generator.gradient_checkpointing:
        bart.gradient_checkpointing_enable()
        bart.config.use_cache = False
        if peft != "none":
            bart.enable_input_require_grads()
    gen = wrap_peft(bart, replace(cfg.generator, peft=peft))
    bert = BertModel(BertConfig(), add_pooling_layer=False)  # bert-base: the DPR question encoder's shape
    if cfg.retriever.gradient_checkpointing:
        bert.gradient_checkpointing_enable()
    enc = BiEncoder(bert, None, pooling="cls")
    n, rng = 2000, np.random.default_rng(0)
    lengths = rng.integers(cfg.generator.max_passage_length - 20, cfg.generator.max_passage_length, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    passages = TokenizedPassages(rng.integers(5, 50000, offsets[-1]).astype(np.int32), offsets, {})
    emb = rng.standard_normal((n, 768)).astype(np.float16)
    model = RagModel(enc, gen, StaticRetrieval(build_index(emb.astype(np.float32)), emb), cfg.rag, passages,
                     PairTemplate((0,), (2, 2), (2,)), 1, cfg.generator.max_source_length).to(device)
    return model


def batch(cfg, device):
    from rag_e2e.model import RagBatch

    b, rng = cfg.optim.batch_size, np.random.default_rng(1)
    q = torch.from_numpy(rng.integers(1000, 30000, (b, 20)))
    labels = torch.from_numpy(rng.integers(5, 50000, (b, cfg.generator.max_target_length)))
    return RagBatch(q.to(device), torch.ones_like(q).to(device), [list(rng.integers(5, 50000, 20)) for _ in range(b)],
                    labels.to(device))


def one_step(model, opt, rb, dtype, device):
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = model(rb).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


class _NoHook:
    def remove(self) -> None:
        pass


def measure(cfg, peft: str, dtype, device) -> dict:
    from torch.distributed._tools.mem_tracker import MemTracker

    model = build(cfg, peft, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    rb = batch(cfg, device)
    if device.type == "cpu":  # a CPU step takes minutes: create Adam's state (as after step 1) by a zero update
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    tracker = MemTracker()
    for p in model.parameters():  # MemTracker hooks every parameter's grad; frozen ones have none
        if not p.requires_grad:
            tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    tracker.track_external(model, opt)
    if device.type == "cuda":
        one_step(model, opt, rb, dtype, device)  # warm-up: allocator, kernels, optimizer state
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with tracker:
        one_step(model, opt, rb, dtype, device)
    out = {"generator": "bart-large shape", "peft": peft, "dtype": str(dtype).split(".")[-1],
           "k": cfg.rag.n_docs, "batch": cfg.optim.batch_size, "source_len": cfg.generator.max_source_length,
           "trainable_params_m": round(sum(p.numel() for p in params) / 1e6, 1),
           "step_s": round(time.perf_counter() - t0, 1)}
    peak = tracker.get_tracker_snapshot("peak")[device]
    out["peak_gib"] = round(peak["Total"] / 2**30, 2)
    out["peak_by_kind_gib"] = {str(k).split(".")[-1].lower(): round(v / 2**30, 2) for k, v in peak.items()
                               if k != "Total" and v}
    if device.type == "cuda":
        out["cuda_max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main(argv=None):
    from rag_e2e.config import load_config
    from rag_e2e.pipeline import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "rag_16gb.yaml"))
    ap.add_argument("--peft", choices=["both", "lora", "none"], default="both")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    cfg = load_config(TrainConfig, args.config)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for peft in (["lora", "none"] if args.peft == "both" else [args.peft]):
        print(json.dumps(measure(cfg, peft, dtype, torch.device(args.device))), flush=True)


if __name__ == "__main__":
    main()
