"""Batch encoding of passages and questions with a BiEncoder, for index building and mining.

    emb = encode_passages(encoder, tokenized, pad_id=tok.pad_token_id)   # float16 (n, d), row order
    q = encode_texts_as_queries(encoder, tok, questions, max_length=64)  # float32 (q, d)

Passages arrive pre-tokenized (`rag_e2e.passages.tokenize_passages`), so encoding is
model time only. Rows are sorted by token length and cut into batches, each padded to its
own longest row: neighbours in a batch have nearly the same length, so little compute goes
to padding. Batches are a pure function of the lengths (`length_buckets`), which is what
makes a resumed or multi-process encode byte-identical to a single uninterrupted one.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from rag_e2e.encoders import BiEncoder
from rag_e2e.inputs import pad
from rag_e2e.passages import TokenizedPassages

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
           "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def length_buckets(lengths: np.ndarray, batch_size: int, max_tokens: Optional[int] = None) -> list[np.ndarray]:
    """Positions 0..n-1 grouped into batches of similar length, longest batch first.

    lengths: (n,) token counts. A batch holds at most `batch_size` rows and, with
    `max_tokens`, at most that many padded tokens (rows x longest row); longest first so an
    out-of-memory error shows up in the first batch, not after an hour.
    """
    lengths = np.asarray(lengths)
    assert lengths.ndim == 1, f"lengths must be (n,), got {lengths.shape}"
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(-lengths, kind="stable")  # stable: ties keep row order, batches are reproducible
    batches, start = [], 0
    while start < len(order):
        end = min(start + batch_size, len(order))
        if max_tokens is not None:
            longest = max(int(lengths[order[start]]), 1)
            end = min(end, start + max(1, max_tokens // longest))
        batches.append(order[start:end])
        start = end
    return batches


def resolve_dtype(device: torch.device, dtype=None) -> Optional[torch.dtype]:
    """The autocast dtype for `device`: None means full float32.

    Default: bf16 on a GPU that has it, else fp16 on GPU; float32 on CPU (CPU autocast is
    slower than float32 without bf16 hardware, and matches the reference exactly).
    """
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (expected one of {sorted(_DTYPES)})")
        dtype = _DTYPES[dtype]
    if dtype is None:
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None if dtype == torch.float32 else dtype


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Dropout off while encoding; every submodule's own train/eval flag is restored after."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _device_of(module: nn.Module, device) -> torch.device:
    on = next(module.parameters()).device
    if device is not None and torch.device(device) != on:
        if not (torch.device(device).type == on.type == "cuda" and torch.device(device).index is None):
            raise ValueError(f"the encoder is on {on} but device={device} was asked for: move it first")
    return on


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    # unit_scale gives "1.2k psg/s": the throughput figure that matters at corpus scale
    return tqdm(total=total, desc=desc, unit=" psg", unit_scale=True, mininterval=2.0,
                smoothing=0.1, disable=None if enabled else True)


def _check_finite(emb: np.ndarray, rows: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise FloatingPointError(
            f"{what} embeddings of rows {rows[bad][:5].tolist()} are not finite in float16 "
            f"(overflow past 65504 or NaN from the encoder): normalise embeddings or encode in float32")


def encode_passages(encoder: BiEncoder, passages: TokenizedPassages, pad_id: int, batch_size: int = 128,
                    device=None, dtype=None, rows: Optional[Sequence[int]] = None, progress: bool = True,
                    max_tokens: Optional[int] = None) -> np.ndarray:
    """Document-encoder embeddings of passages -> float16 (n, d), in the order of `rows`.

    rows: passage rows to encode (default all, 0..len(passages)-1).
    device: must be where `encoder.doc_encoder` already is (default: there); the encoder is
    not moved, so a model in training keeps its place. dtype: autocast dtype ("bf16",
    "fp16", "fp32" or a torch dtype); default bf16/fp16 on GPU, float32 on CPU.
    The encoder is put in eval mode (no dropout) for the call and restored after.
    """
    rows = np.arange(len(passages), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    assert rows.ndim == 1, f"rows must be (n,), got {rows.shape}"
    if len(rows) and (rows.min() < 0 or rows.max() >= len(passages)):
        raise IndexError(f"rows must lie in 0..{len(passages) - 1}, got {rows.min()}..{rows.max()}")
    model = encoder.doc_encoder
    dev = _device_of(model, device)
    amp = resolve_dtype(dev, dtype)
    out = np.empty((len(rows), encoder.dim), dtype=np.float16)  # (n, d)
    lengths = passages.lengths()[rows]
    bar = _progress(len(rows), "encoding passages", progress)
    with eval_mode(model), torch.inference_mode(), _autocast(dev, amp):
        for batch in length_buckets(lengths, batch_size, max_tokens):
            ids, mask = pad([passages.get(int(r)) for r in rows[batch]], pad_id)  # (n, s) each
            if dev.type == "cuda":
                ids, mask = ids.pin_memory().to(dev, non_blocking=True), mask.pin_memory().to(dev, non_blocking=True)
            emb = encoder.encode_docs(ids, mask)  # (n, d)
            out[batch] = emb.float().cpu().numpy()
            bar.update(len(batch))
    bar.close()
    _check_finite(out, rows, "passage")
    return out


def encode_texts_as_queries(encoder: BiEncoder, tokenizer, questions: Sequence[str], max_length: int = 64,
                            batch_size: int = 128, device=None, dtype=None, progress: bool = False) -> np.ndarray:
    """Query-encoder embeddings of question strings -> float32 (q, d), in the given order."""
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"question {i} is empty or not a string: {q!r}")
    model = encoder.query_encoder
    dev = _device_of(model, device)
    amp = resolve_dtype(dev, dtype)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_list = tokenizer(list(questions), truncation=True, max_length=max_length)["input_ids"]
    out = np.empty((len(ids_list), encoder.dim), dtype=np.float32)  # (q, d)
    bar = tqdm(total=len(ids_list), desc="encoding questions", unit=" q", mininterval=2.0,
               disable=None if progress else True)
    with eval_mode(model), torch.inference_mode(), _autocast(dev, amp):
        for batch in length_buckets(np.array([len(x) for x in ids_list]), batch_size):
            ids, mask = pad([ids_list[i] for i in batch], pad_id)  # (b, s) each
            out[batch] = encoder.encode_queries(ids.to(dev), mask.to(dev)).float().cpu().numpy()
            bar.update(len(batch))
    bar.close()
    return out
