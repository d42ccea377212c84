"""Assembling model inputs from pre-tokenized ids: no string work in a training step.

The generator reads "question, then title / passage" for each of the k retrieved passages,
joined with the tokenizer's own pair template (BART: `<s> q </s></s> p </s>`,
T5: `q </s> p </s>`). Only the passage is truncated, never the question.
Batches are padded to their own longest row (dynamic padding), not to a fixed length.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rag_e2e.passages import TokenizedPassages


@dataclass(frozen=True)
class PairTemplate:
    """Special tokens around a pair: prefix + a + middle + b + suffix."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]

    @property
    def n_special(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def join(self, a, b) -> list[int]:
        return [*self.prefix, *a, *self.middle, *b, *self.suffix]


def pair_template(tokenizer) -> PairTemplate:
    """Read the tokenizer's pair template off one encoded example (works for any tokenizer)."""
    a = tokenizer("a", add_special_tokens=False)["input_ids"]
    b = tokenizer("b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", "b")["input_ids"]
    i = next((i for i in range(len(full)) if full[i:i + len(a)] == a), None)
    j = next((j for j in range(len(full) - len(b), -1, -1) if full[j:j + len(b)] == b), None)
    if i is None or j is None or j < i + len(a):
        raise ValueError(f"cannot read the pair template of tokenizer {type(tokenizer).__name__}: {full}")
    return PairTemplate(tuple(full[:i]), tuple(full[i + len(a): j]), tuple(full[j + len(b):]))


def pad(rows: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to the longest: -> input_ids (n, s), attention_mask (n, s)."""
    s = max(len(r) for r in rows)
    ids = np.full((len(rows), s), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), s), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def generator_inputs(question_ids: list[list[int]], doc_ids: np.ndarray, passages: TokenizedPassages,
                     template: PairTemplate, max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """b questions x k retrieved passages -> generator inputs (b*k, s), row i*k+j = (q_i, p_ij).

    question_ids: b lists of ids without special tokens; doc_ids: (b, k) passage rows.
    """
    b, k = doc_ids.shape
    assert len(question_ids) == b, f"{len(question_ids)} questions for {b} rows of doc ids"
    rows = []
    for q, docs in zip(question_ids, doc_ids):
        budget = max_length - len(q) - template.n_special
        if budget <= 0:
            raise ValueError(f"a question of {len(q)} tokens leaves no room for its passage in "
                             f"generator.max_source_length={max_length}; raise it or shorten questions")
        rows.extend(template.join(q, passages.get(int(z))[:budget]) for z in docs)
    return pad(rows, pad_id)


def doc_encoder_inputs(doc_ids: np.ndarray, passages: TokenizedPassages, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, k) passage rows -> document-encoder inputs (b*k, s), already templated at tokenization."""
    return pad([passages.get(int(z)) for z in doc_ids.reshape(-1)], pad_id)


def tokenize_questions(tokenizer, questions: list[str], max_length: int) -> list[list[int]]:
    """Questions -> id lists without special tokens (the template adds them). Empty questions are an error."""
    for i, q in enumerate(questions):
        if not q or not q.strip():
            raise ValueError(f"question {i} is empty")
    return tokenizer(questions, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]


def query_inputs(tokenizer, questions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Questions -> query-encoder inputs with the tokenizer's special tokens, dynamically padded."""
    enc = tokenizer(questions, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def target_labels(tokenizer, answers: list[str], max_length: int) -> torch.Tensor:
    """Target strings -> labels (b, t), -100 on padding. The tokenizer's own specials (eos) are kept."""
    enc = tokenizer(text_target=answers, truncation=True, max_length=max_length)
    ids, mask = pad(enc["input_ids"], 0)
    return ids.masked_fill(mask == 0, -100)
