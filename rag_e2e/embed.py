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
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from rag_e2e.encoders import BiEncoder
from rag_e2e.index import encoder_fingerprint
from rag_e2e.inputs import pad
from rag_e2e.passages import TokenizedPassages

_DTYPES = {"auto": None, "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
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
        asked = torch.device(device)
        # "cuda" means the current GPU; "cpu" and "cpu:0" (accelerate's MULTI_CPU) are one device
        if not (asked.type == on.type and (asked.type == "cpu" or asked.index is None)):
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


def unit_rows(x: np.ndarray) -> np.ndarray:
    """(n, d) -> the rows scaled to unit length (cosine scores by inner product), same dtype."""
    x32 = x.astype(np.float32)
    return (x32 / np.linalg.norm(x32, axis=1, keepdims=True).clip(min=1e-12)).astype(x.dtype)


def auto_batch_size(batch_size: int, device: torch.device) -> int:
    """0 = the measured default for the device: 32 passages on CPU (all-MiniLM-L6-v2, 2 cores:
    41 passages/s at 16-32, 33 at 128: big batches of long rows fall out of cache), 256 on GPU."""
    return batch_size if batch_size > 0 else (32 if device.type == "cpu" else 256)


def encode_passages(encoder: BiEncoder, passages: TokenizedPassages, pad_id: int, batch_size: int = 0,
                    device=None, dtype=None, rows: Optional[Sequence[int]] = None, progress: bool = True,
                    max_tokens: Optional[int] = None) -> np.ndarray:
    """Document-encoder embeddings of passages -> float16 (n, d), in the order of `rows`.

    rows: passage rows to encode (default all, 0..len(passages)-1). batch_size: rows per
    forward pass at most (0: `auto_batch_size`).
    device: must be where `encoder.doc_encoder` already is (default: there); the encoder is
    not moved, so a model in training keeps its place. dtype: autocast dtype ("bf16",
    "fp16", "fp32" or a torch dtype); default bf16/fp16 on GPU, float32 on CPU.
    The encoder is put in eval mode (no dropout) for the call and restored after.
    """
    rows = np.arange(len(passages), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    assert rows.ndim == 1, f"rows must be (n,), got {rows.shape}"
    if len(rows) and (rows.min() < 0 or rows.max() >= len(passages)):
        raise IndexError(f"rows must lie in 0..{len(passages) - 1}, got {rows.min()}..{rows.max()}")
    bar = _progress(len(rows), "encoding passages", progress)
    out = _encode_rows(encoder, passages, pad_id, rows, batch_size, device, dtype, max_tokens, bar)
    bar.close()
    return out


def _encode_rows(encoder: BiEncoder, passages: TokenizedPassages, pad_id: int, rows: np.ndarray, batch_size: int,
                 device, dtype, max_tokens: Optional[int], bar: tqdm) -> np.ndarray:
    model = encoder.doc_encoder
    dev = _device_of(model, device)
    amp = resolve_dtype(dev, dtype)
    out = np.empty((len(rows), encoder.dim), dtype=np.float16)  # (n, d)
    lengths = passages.lengths()[rows]
    with eval_mode(model), torch.inference_mode(), _autocast(dev, amp):
        for batch in length_buckets(lengths, auto_batch_size(batch_size, dev), max_tokens):
            ids, mask = pad([passages.get(int(r)) for r in rows[batch]], pad_id)  # (n, s) each
            if dev.type == "cuda":
                ids, mask = ids.pin_memory().to(dev, non_blocking=True), mask.pin_memory().to(dev, non_blocking=True)
            emb = encoder.encode_docs(ids, mask)  # (n, d)
            out[batch] = emb.float().cpu().numpy()
            bar.update(len(batch))
    _check_finite(out, rows, "passage")
    return out


def encode_texts_as_queries(encoder: BiEncoder, tokenizer, questions: Sequence[str], max_length: int = 64,
                            batch_size: int = 0, device=None, dtype=None, progress: bool = False) -> np.ndarray:
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
        for batch in length_buckets(np.array([len(x) for x in ids_list]), auto_batch_size(batch_size, dev)):
            ids, mask = pad([ids_list[i] for i in batch], pad_id)  # (b, s) each
            out[batch] = encoder.encode_queries(ids.to(dev), mask.to(dev)).float().cpu().numpy()
            bar.update(len(batch))
    bar.close()
    return out


class EncodeError(ValueError):
    """Shards on disk that do not belong to this run, or a missing or damaged shard."""


@dataclass
class EncodeConfig:
    batch_size: int = 0  # passages per forward pass at most; 0 = 32 on CPU, 256 on GPU (measured)
    max_tokens: Optional[int] = None  # also cap padded tokens per batch: flat memory when lengths vary
    shard_size: int = 100_000  # passages per shard file: the unit of resume and of work split
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # GPU autocast; auto = bf16 where supported, else fp16
    max_shards: Optional[int] = None  # stop after this many shards per process (time-limited jobs); rerun resumes
    keep_shards: bool = False  # keep shard files after the merge (they double the disk use)


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of the shards of n passages."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npy")  # per process: ranks never share a tmp name
    np.save(tmp, array)
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def run_manifest(encoder: BiEncoder, passages: TokenizedPassages, shard_size: int) -> dict:
    """What a set of shards is made of: shards of different runs must never be mixed."""
    return {"passages": passages.meta.get("passages"), "count": len(passages), "dim": encoder.dim,
            "encoder": encoder_fingerprint(encoder.doc_encoder), "tokenizer": passages.meta.get("tokenizer"),
            "max_length": passages.meta.get("max_length"), "shard_size": shard_size}


def _check_manifest(shard_dir: Path, manifest: dict) -> None:
    path = shard_dir / "manifest.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in manifest if old.get(k) != manifest[k])
        if diff:
            raise EncodeError(f"{shard_dir} holds shards of another run ({diff[0]}: {old.get(diff[0])!r} there, "
                              f"{manifest[diff[0]]!r} now): delete it or choose another out_dir")
    else:
        shard_dir.mkdir(parents=True, exist_ok=True)
        _write_json(path, manifest)


def _shard_done(path: Path, rows: int, dim: int) -> bool:
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise EncodeError(f"{path} is damaged ({e}): delete it and run again to re-encode it") from None
    if arr.shape != (rows, dim) or arr.dtype != np.float16:
        raise EncodeError(f"{path} holds {arr.dtype} {arr.shape}, expected float16 ({rows}, {dim}): delete it")
    return True


def encode_shards(encoder: BiEncoder, passages: TokenizedPassages, pad_id: int, out_dir: str | os.PathLike,
                  cfg: Optional[EncodeConfig] = None, rank: int = 0, world_size: int = 1,
                  progress: bool = True) -> list[int]:
    """Encode this process's missing shards into out_dir/shards; returns the shards it encoded.

    Process `rank` of `world_size` takes shards rank, rank+world_size, ...; a shard already
    on disk is skipped, so a killed run resumes where it stopped. Each shard's batches depend
    only on its rows, so any split over processes gives byte-identical embeddings.
    """
    cfg = cfg or EncodeConfig()
    shard_dir = Path(out_dir) / "shards"
    manifest = run_manifest(encoder, passages, cfg.shard_size)
    _check_manifest(shard_dir, manifest)
    ranges = shard_ranges(len(passages), cfg.shard_size)
    mine = [s for s in range(rank, len(ranges), world_size)]
    todo = [s for s in mine if not _shard_done(shard_dir / f"shard-{s:05d}.npy", ranges[s][1] - ranges[s][0],
                                                encoder.dim)]
    todo = todo[: cfg.max_shards] if cfg.max_shards is not None else todo
    bar = _progress(sum(ranges[s][1] - ranges[s][0] for s in todo), f"encoding [rank {rank}]", progress)
    dtype = None if cfg.dtype == "auto" else cfg.dtype
    for s in todo:
        rows = np.arange(*ranges[s], dtype=np.int64)
        emb = _encode_rows(encoder, passages, pad_id, rows, cfg.batch_size, None, dtype, cfg.max_tokens, bar)
        _save_npy(shard_dir / f"shard-{s:05d}.npy", emb)
    bar.close()
    return todo


def missing_shards(out_dir: str | os.PathLike, n: int, shard_size: int) -> list[int]:
    shard_dir = Path(out_dir) / "shards"
    return [s for s in range(len(shard_ranges(n, shard_size))) if not (shard_dir / f"shard-{s:05d}.npy").is_file()]


def merge_shards(out_dir: str | os.PathLike, ids: Optional[np.ndarray] = None, keep_shards: bool = False) -> Path:
    """Concatenate the shards into out_dir/embeddings.npy (fp16 (n, d), memory-mappable) + embeddings.json.

    ids: the passage ids in store order, written to out_dir/ids.npy.
    """
    out_dir = Path(out_dir)
    shard_dir = out_dir / "shards"
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    n, d = manifest["count"], manifest["dim"]
    missing = missing_shards(out_dir, n, manifest["shard_size"])
    if missing:
        raise EncodeError(f"{shard_dir}: shards {missing[:5]} are missing ({len(missing)} in all): run the encode again")
    final = out_dir / "embeddings.npy"
    tmp = out_dir / f"embeddings.tmp-{os.getpid()}.npy"
    merged = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, d))  # (n, d)
    for s, (start, end) in enumerate(shard_ranges(n, manifest["shard_size"])):
        path = shard_dir / f"shard-{s:05d}.npy"
        _shard_done(path, end - start, d)
        merged[start:end] = np.load(path, mmap_mode="r", allow_pickle=False)
    merged.flush()
    del merged
    if ids is not None:
        if len(ids) != n:
            raise EncodeError(f"{len(ids)} passage ids for {n} embeddings")
        _save_npy(out_dir / "ids.npy", np.asarray(ids, dtype=str))
    os.replace(tmp, final)
    _write_json(out_dir / "embeddings.json", manifest)  # written last: its presence means complete
    if not keep_shards:
        for s in range(len(shard_ranges(n, manifest["shard_size"]))):
            (shard_dir / f"shard-{s:05d}.npy").unlink()
        (shard_dir / "manifest.json").unlink()
        shard_dir.rmdir()
    return final
