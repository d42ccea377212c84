"""RagModel: retriever + MIPS index + generator, trained through the marginal likelihood.

    question -> q(x) (with grad) -> index top-k (no grad) -> d(z) of the k passages
             -> doc scores q(x)·d(z) (with grad) -> generator on b·k (question, passage) inputs
             -> RAG-Sequence or RAG-Token NLL

Document embeddings come from one of two places:
  paper mode:      rows of the stored fp16 embedding matrix (document encoder frozen, as in the paper);
  end2end mode:    the retrieved passages re-embedded by the live document encoder, so it gets gradient
                   (the index itself goes stale until it is rebuilt: see rag_e2e.rebuild).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Protocol

import numpy as np
import torch
import torch.nn as nn
from einops import rearrange

from rag_e2e.encoders import BiEncoder
from rag_e2e.inputs import PairTemplate, doc_encoder_inputs, generator_inputs
from rag_e2e.marginalize import rag_sequence_nll, rag_token_nll
from rag_e2e.passages import TokenizedPassages


@dataclass
class RagConfig:
    n_docs: int = 5  # k: passages retrieved per question (paper: 5 or 10 in training)
    marginalize: Literal["sequence", "token"] = "sequence"
    mode: Literal["paper", "end2end"] = "paper"  # paper: document encoder frozen, stored embeddings
    label_smoothing: float = 0.0  # epsilon; the paper used 0.1 for RAG
    doc_score_scale: float = 1.0  # p(z|x) = softmax(scale * q·d); >1 sharpens cosine-scale scores
    train_query_encoder: bool = True


class Retrieval(Protocol):
    """What RagModel needs from an index: search, and the stored embeddings of what it returns."""

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def doc_embeddings(self, ids: np.ndarray) -> np.ndarray: ...


class StaticRetrieval:
    """A fixed index with its fp16 embedding matrix (paper mode; evaluation)."""

    def __init__(self, index, embeddings: np.ndarray):
        if index.ntotal != len(embeddings):
            raise ValueError(f"index holds {index.ntotal} passages but the embedding matrix has {len(embeddings)} rows")
        self.index = index
        self.embeddings = embeddings

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k)

    def doc_embeddings(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embeddings[ids.reshape(-1)]).reshape(*ids.shape, -1)


@dataclass
class RagBatch:
    query_input_ids: torch.Tensor  # (b, sq) query-encoder tokens
    query_attention_mask: torch.Tensor  # (b, sq)
    question_ids: list  # b lists of generator-tokenizer ids, no special tokens
    labels: Optional[torch.Tensor] = None  # (b, t), -100 where ignored


@dataclass
class RagOutput:
    loss: Optional[torch.Tensor]  # scalar: mean over the batch of the per-example NLL
    nll: Optional[torch.Tensor]  # (b,)
    doc_scores: torch.Tensor  # (b, k) scaled scores, the logits of p(z|x)
    doc_ids: np.ndarray  # (b, k) passage rows, best first
    logits: Optional[torch.Tensor] = None  # (b, k, t, v)
    context_input_ids: Optional[torch.Tensor] = None  # (b*k, s)
    context_attention_mask: Optional[torch.Tensor] = None


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Teacher-forcing decoder inputs: (n, t) labels -> (n, t) starting with `start_id`."""
    dec = labels.new_full(labels.shape, pad_id)
    dec[:, 1:] = labels[:, :-1]
    dec[:, 0] = start_id
    return dec.masked_fill(dec == -100, pad_id)


class RagModel(nn.Module):
    def __init__(self, retriever: BiEncoder, generator: nn.Module, retrieval: Retrieval, cfg: RagConfig,
                 gen_passages: TokenizedPassages, template: PairTemplate, gen_pad_id: int,
                 max_source_length: int, doc_passages: TokenizedPassages | None = None, doc_pad_id: int = 0):
        super().__init__()
        self.retriever = retriever
        self.generator = generator
        self.retrieval = retrieval
        self.cfg = cfg
        self.gen_passages = gen_passages
        self.template = template
        self.gen_pad_id = gen_pad_id
        self.max_source_length = max_source_length
        self.doc_passages = doc_passages
        self.doc_pad_id = doc_pad_id
        if cfg.mode == "end2end" and doc_passages is None:
            raise ValueError("rag.mode=end2end needs the passages tokenized for the document encoder")
        if cfg.mode == "paper" and not retriever.shared:
            # Paper mode reads stored embeddings: the document encoder takes no part in the step.
            self.retriever.doc_encoder.requires_grad_(False)
        if not cfg.train_query_encoder:
            self.retriever.query_encoder.requires_grad_(False)

    @property
    def gen_config(self):
        return self.generator.config

    def _doc_vectors(self, ids: np.ndarray, q: torch.Tensor) -> torch.Tensor:
        """Embeddings of passages `ids` (b, k) -> (b, k, d): stored rows (paper) or live encoder (end2end)."""
        if self.cfg.mode == "paper":
            return torch.from_numpy(self.retrieval.doc_embeddings(ids).astype(np.float32)).to(q)
        ids_t, mask = doc_encoder_inputs(ids, self.doc_passages, self.doc_pad_id)
        d = self.retriever.encode_docs(ids_t.to(q.device), mask.to(q.device))  # (b*k, d)
        return rearrange(d, "(b k) d -> b k d", k=ids.shape[1])

    def retrieve(self, batch: RagBatch, k: int | None = None, doc_ids: np.ndarray | None = None):
        """-> doc_scores (b, k) with grad to the encoders, doc_ids (b, k) passage rows, best first.

        `doc_ids` skips the search and scores the given passages instead.
        """
        k = k or self.cfg.n_docs
        q = self.retriever.encode_queries(batch.query_input_ids, batch.query_attention_mask)  # (b, d)
        ids = doc_ids
        if ids is None:
            with torch.no_grad():
                _, ids = self.retrieval.search(q.detach().float().cpu().numpy(), k)  # (b, k)
            if (ids < 0).any():
                raise RuntimeError(f"the index returned fewer than k={k} passages for some question")
        d = self._doc_vectors(ids, q)  # (b, k, d)
        scores = torch.einsum("bd,bkd->bk", q.float(), d.float()) * self.cfg.doc_score_scale  # (b, k)
        return scores, ids

    def contexts(self, batch: RagBatch, doc_ids: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = generator_inputs(batch.question_ids, doc_ids, self.gen_passages, self.template,
                                     self.max_source_length, self.gen_pad_id)
        return ids.to(device), mask.to(device)

    def forward(self, batch: RagBatch, doc_ids: np.ndarray | None = None, return_logits: bool = False) -> RagOutput:
        """Training forward. `doc_ids` (b, k) overrides retrieval of the passages (scores still computed)."""
        doc_scores, ids = self.retrieve(batch, doc_ids=doc_ids)
        k = ids.shape[1]
        device = doc_scores.device
        ctx_ids, ctx_mask = self.contexts(batch, ids, device)
        out = RagOutput(None, None, doc_scores, ids, None, ctx_ids, ctx_mask)
        if batch.labels is None:
            return out
        labels = batch.labels.to(device)  # (b, t)
        rep = labels.repeat_interleave(k, dim=0)  # (b*k, t)
        cfg = self.gen_config
        dec_in = shift_right(rep, cfg.decoder_start_token_id, cfg.pad_token_id)
        logits = self.generator(input_ids=ctx_ids, attention_mask=ctx_mask, decoder_input_ids=dec_in,
                                use_cache=False).logits  # (b*k, t, v)
        logits = rearrange(logits, "(b k) t v -> b k t v", k=k)
        nll_fn = rag_sequence_nll if self.cfg.marginalize == "sequence" else rag_token_nll
        out.nll = nll_fn(logits, doc_scores, labels, epsilon=self.cfg.label_smoothing)
        out.loss = out.nll.mean()
        if return_logits:
            out.logits = logits
        return out
