"""Marginalising over retrieved passages: the RAG-Sequence and RAG-Token objectives.

Shapes: b batch, k retrieved docs, t target length, v vocabulary.
Everything is done in log space; `labels == -100` marks positions that do not count.

    RAG-Sequence: p(y|x) = sum_z p(z|x) prod_t p(y_t|x,z,y<t)
    RAG-Token:    p(y|x) = prod_t sum_z p(z|x) p(y_t|x,z,y<t)

Label smoothing (epsilon):
  RAG-Token smooths the marginal token distribution, as a plain seq2seq model would:
      (1-eps) * -log p(y_t|x,y<t) + eps * mean_v -log p(v|x,y<t)      (summed over t)
  which is transformers' definition as well.
  RAG-Sequence smooths each document's token scores, then marginalises:
      -log sum_z p(z|x) exp( sum_t [(1-eps) log p(y_t|x,z,y<t) + eps mean_v log p(v|x,z,y<t)] )
  so that eps=0 is the exact objective, the prior is counted once per sequence, and k=1
  gives the usual label-smoothed seq2seq loss (torch's `cross_entropy(label_smoothing=eps)`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _check(logits: torch.Tensor, doc_scores: torch.Tensor, labels: torch.Tensor) -> None:
    assert logits.dim() == 4, f"logits must be (b, k, t, v), got {tuple(logits.shape)}"
    b, k, t, _ = logits.shape
    assert doc_scores.shape == (b, k), f"doc_scores must be (b, k)=({b}, {k}), got {tuple(doc_scores.shape)}"
    assert labels.shape == (b, t), f"labels must be (b, t)=({b}, {t}), got {tuple(labels.shape)}"


def _token_logprobs(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Per-document, per-position (smoothed) log-likelihood of the labels: (b, k, t), 0 where ignored."""
    lp = F.log_softmax(logits.float(), dim=-1)  # (b, k, t, v)
    mask = labels != IGNORE  # (b, t)
    idx = labels.clamp(min=0)[:, None, :, None].expand(-1, lp.size(1), -1, 1)  # (b, k, t, 1)
    tok = lp.gather(-1, idx).squeeze(-1)  # (b, k, t)
    if epsilon > 0:
        tok = (1.0 - epsilon) * tok + epsilon * lp.mean(dim=-1)
    return tok * mask[:, None, :]


def rag_sequence_nll(
    logits: torch.Tensor, doc_scores: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.0
) -> torch.Tensor:
    """-log sum_z p(z|x) p(y|x,z) per example.

    logits: (b, k, t, v) generator logits aligned with labels; doc_scores: (b, k) unnormalised
    retrieval scores; labels: (b, t) long, -100 where ignored. Returns (b,), summed over tokens.
    """
    _check(logits, doc_scores, labels)
    doc_lp = F.log_softmax(doc_scores.float(), dim=-1)  # (b, k)
    seq_lp = _token_logprobs(logits, labels, epsilon).sum(-1)  # (b, k)
    return -torch.logsumexp(doc_lp + seq_lp, dim=-1)


def rag_token_logprobs(logits: torch.Tensor, doc_scores: torch.Tensor) -> torch.Tensor:
    """log p(v|x,y<t) = log sum_z p(z|x) p(v|x,z,y<t): (b, k, t, v), (b, k) -> (b, t, v)."""
    doc_lp = F.log_softmax(doc_scores.float(), dim=-1)  # (b, k)
    lp = F.log_softmax(logits.float(), dim=-1)  # (b, k, t, v)
    return torch.logsumexp(lp + doc_lp[:, :, None, None], dim=1)


def rag_token_nll(
    logits: torch.Tensor, doc_scores: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.0
) -> torch.Tensor:
    """-sum_t log sum_z p(z|x) p(y_t|x,z,y<t) per example.

    Same shapes and conventions as `rag_sequence_nll`. Returns (b,).
    """
    _check(logits, doc_scores, labels)
    marg = rag_token_logprobs(logits, doc_scores)  # (b, t, v)
    mask = labels != IGNORE
    tok = marg.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)  # (b, t)
    if epsilon > 0:
        tok = (1.0 - epsilon) * tok + epsilon * marg.mean(dim=-1)
    return -(tok * mask).sum(-1)


def doc_posterior(logits: torch.Tensor, doc_scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p(z|x,y) ∝ p(z|x) p(y|x,z): which passage explains the answer (provenance). (b, k)."""
    _check(logits, doc_scores, labels)
    doc_lp = F.log_softmax(doc_scores.float(), dim=-1)
    seq_lp = _token_logprobs(logits, labels, 0.0).sum(-1)
    return torch.softmax(doc_lp + seq_lp, dim=-1)


def doc_prior_entropy(doc_scores: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of p(z|x) per example: (b, k) -> (b,). Collapse to one passage shows as 0."""
    lp = F.log_softmax(doc_scores.float(), dim=-1)
    return -(lp.exp() * lp).sum(-1)
