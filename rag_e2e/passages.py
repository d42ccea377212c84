"""The passage store: passages read once, validated, and tokenized once.

Passages come from DPR's `psgs_w100.tsv` (header `id text title`) or JSONL
(`{"id", "title", "text"}` per line). Row i of the store is id i of every index built
over it, so ids stay in step by construction.

Tokenization happens once per tokenizer and is kept as two memory-mapped arrays
(`tokens.bin`: all token ids back to back; `offsets.npy`: where each passage starts),
so a training step only slices and concatenates ids: no string work per step.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

csv.field_size_limit(sys.maxsize)


class DataError(ValueError):
    """Malformed input data; the message names the file and line."""


def _tsv_rows(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (expected a header 'id<TAB>text<TAB>title')")
        cols = [h.strip().lower() for h in header]
        missing = {"id", "text", "title"} - set(cols)
        if missing:
            raise DataError(f"{path}:1: header {header} lacks column(s) {sorted(missing)}")
        at = {c: cols.index(c) for c in ("id", "text", "title")}
        for row in reader:
            line = reader.line_num
            if len(row) != len(cols):
                raise DataError(f"{path}:{line}: expected {len(cols)} tab-separated fields, got {len(row)}")
            yield line, row[at["id"]], row[at["title"]], row[at["text"]]


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise DataError(f"{path}:{line}: expected an object with 'id', 'title' and 'text'")
            pid = obj.get("id", obj.get("passage_id", obj.get("_id")))
            if pid is None:
                raise DataError(f"{path}:{line}: passage has no 'id'")
            yield line, str(pid), str(obj.get("title", "")), str(obj["text"])


def _validated_rows(path: Path, digest):
    rows = _jsonl_rows(path) if path.suffix in (".jsonl", ".json") else _tsv_rows(path)
    seen: dict[str, int] = {}
    for line, pid, title, text in rows:
        pid = pid.strip()
        if not pid:
            raise DataError(f"{path}:{line}: empty passage id")
        if pid in seen:
            raise DataError(f"{path}:{line}: duplicate passage id {pid!r} (first at line {seen[pid]})")
        if not text.strip():
            raise DataError(f"{path}:{line}: passage {pid!r} has no text")
        seen[pid] = line
        digest.update(f"{pid}\t{title}\t{text}\n".encode())
        yield {"id": pid, "title": title, "text": text}


class PassageStore:
    """Passages as an Arrow table (memory-mapped when large); row i is index id i."""

    def __init__(self, table: datasets.Dataset, fingerprint: str, source: str = ""):
        self.table = table
        self.fingerprint = fingerprint
        self.source = source
        self._row_of: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        return self.table[int(i)]

    @property
    def ids(self) -> list[str]:
        return self.table["id"]

    def _rows(self) -> dict[str, int]:
        if self._row_of is None:
            self._row_of = {pid: i for i, pid in enumerate(self.table["id"])}
        return self._row_of

    def row_of(self, passage_id: str) -> int:
        """Row (= index id) of a passage id; KeyError names the id."""
        try:
            return self._rows()[str(passage_id)]
        except KeyError:
            raise KeyError(f"passage id {passage_id!r} is not in the passage store {self.source}") from None

    def rows_of(self, passage_ids) -> set[int]:
        """Rows of the ids that are in the store (gold passages of a question; absent ones skipped)."""
        rows = self._rows()
        return {rows[str(p)] for p in passage_ids if str(p) in rows}

    @classmethod
    def from_records(cls, records: list[dict]) -> "PassageStore":
        """In-memory store from dicts with id, title, text (tests, the demo)."""
        digest = hashlib.sha256()
        for r in records:
            digest.update(f"{r['id']}\t{r.get('title', '')}\t{r['text']}\n".encode())
        table = datasets.Dataset.from_dict({
            "id": [str(r["id"]) for r in records],
            "title": [str(r.get("title", "")) for r in records],
            "text": [str(r["text"]) for r in records],
        })
        return cls(table, digest.hexdigest()[:16], "<records>")


def read_passages(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> PassageStore:
    """Read and validate a passages file (DPR tsv or JSONL).

    Raises DataError naming the file and line on a malformed row, an empty id or text,
    or a duplicate id. With `cache_dir`, the Arrow table is written there (memory-mapped).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"passages file {path} does not exist")
    digest = hashlib.sha256()
    rows = list(tqdm(_validated_rows(path, digest), desc=f"reading {path.name}", unit=" psg",
                     mininterval=2.0, disable=None))
    if not rows:
        raise DataError(f"{path}: no passages")
    table = datasets.Dataset.from_list(rows)
    if cache_dir is not None:
        out = Path(cache_dir) / "passages.arrow"
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        table.save_to_disk(str(tmp))
        if out.exists():
            import shutil
            shutil.rmtree(out)
        os.replace(tmp, out)
        table = datasets.load_from_disk(str(out))
    return PassageStore(table, digest.hexdigest()[:16], str(path))


@dataclass
class TokenizedPassages:
    """Token ids of every passage, back to back: passage i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # (total,) int32, memory-mapped when loaded from disk
    offsets: np.ndarray  # (n+1,) int64
    meta: dict

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def save(self, out_dir: str | os.PathLike) -> None:
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        self.tokens.astype(np.int32).tofile(tmp / "tokens.bin")
        np.save(tmp / "offsets.npy", self.offsets.astype(np.int64))
        (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2))
        if out.exists():
            import shutil
            shutil.rmtree(out)
        os.replace(tmp, out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenizedPassages":
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        offsets = np.load(path / "offsets.npy", allow_pickle=False)
        tokens = np.memmap(path / "tokens.bin", dtype=np.int32, mode="r")
        if len(tokens) != offsets[-1]:
            raise DataError(f"{path}/tokens.bin holds {len(tokens)} ids, offsets.npy expects {offsets[-1]}")
        return cls(tokens, offsets, meta)


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def tokenize_passages(store: PassageStore, tokenizer, kind: str, max_length: int,
                      batch_size: int = 2048, cache_dir: str | os.PathLike | None = None) -> TokenizedPassages:
    """Tokenize every passage once.

    kind="generator": ids of "title / text" with no special tokens (they are added when a
    question is joined to it), cut to `max_length`.
    kind="retriever": the full document-encoder input `[CLS] title [SEP] text [SEP]`
    (the tokenizer's pair template), text truncated to `max_length` in all.
    With `cache_dir`, a cached result for the same store, tokenizer and length is reused.
    """
    if kind not in ("generator", "retriever"):
        raise ValueError(f"kind must be 'generator' or 'retriever', got {kind!r}")
    meta = {"kind": kind, "max_length": max_length, "passages": store.fingerprint,
            "tokenizer": tokenizer_fingerprint(tokenizer), "count": len(store)}
    cached = Path(cache_dir) / f"tok-{kind}-{meta['tokenizer']}-{max_length}" if cache_dir else None
    if cached is not None and (cached / "meta.json").is_file():
        tp = TokenizedPassages.load(cached)
        if tp.meta == meta:
            return tp
    chunks, lengths = [], []
    for start in tqdm(range(0, len(store), batch_size), desc=f"tokenizing passages ({kind})",
                      unit=" batch", disable=None, mininterval=2.0):
        batch = store.table[start: start + batch_size]
        if kind == "generator":
            texts = [f"{t} / {x}" if t else x for t, x in zip(batch["title"], batch["text"])]
            enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_length)
        else:
            enc = tokenizer(batch["title"], batch["text"], truncation="only_second", max_length=max_length)
        for ids in enc["input_ids"]:
            chunks.append(np.asarray(ids, dtype=np.int32))
            lengths.append(len(ids))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tp = TokenizedPassages(np.concatenate(chunks), offsets, meta)
    if cached is not None:
        tp.save(cached)
        tp = TokenizedPassages.load(cached)
    return tp
