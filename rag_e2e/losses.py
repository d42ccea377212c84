"""Contrastive retriever loss: InfoNCE over in-batch and mined negatives (DPR-style).

For question i with embedding q_i and candidate passages c_1..c_n (every question's positive
and negatives in the batch, gathered from all processes), with p(i) the index of its positive:

    loss_i = -log  exp(s(q_i, c_p(i)) / tau) / sum_{j not excluded} exp(s(q_i, c_j) / tau)

s is the dot product (DPR, Karpukhin et al. 2020) or the cosine. Candidates that are the same
passage as the positive, or that contain an answer, are not negatives at all and are left out
of the denominator (`exclude`); the positive itself is never excluded.

Also here, because they decide how the loss reaches the encoders:
- `gather_with_grad`: candidates from every process join the pool (it grows with the number
  of processes); the local ones keep their gradient and the gradient of the others' losses
  with respect to them comes back (open_clip's gather_with_grad).
- `contrastive_backward`: the backward pass, optionally with gradient caching (Gao et al.
  2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"), which
  makes memory independent of the batch size so DPR's batch of 128 fits on one 16 GB GPU.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

# --- the loss (pure) ---------------------------------------------------------------------


def similarity(q: torch.Tensor, c: torch.Tensor, score: str = "dot") -> torch.Tensor:
    """q: (b, d), c: (n, d) -> (b, n) dot-product or cosine scores."""
    assert q.dim() == 2 and c.dim() == 2 and q.shape[1] == c.shape[1], f"q {tuple(q.shape)}, c {tuple(c.shape)}"
    if score == "cosine":
        q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
    elif score != "dot":
        raise ValueError(f"score must be 'dot' or 'cosine', got {score!r}")
    return q @ c.T  # (b, d) x (d, n) -> (b, n)


def info_nce(q: torch.Tensor, candidates: torch.Tensor, positive: torch.Tensor,
             exclude: Optional[torch.Tensor] = None, temperature: float | torch.Tensor = 1.0,
             score: str = "dot") -> torch.Tensor:
    """Per-question InfoNCE loss -> (b,).

    q: (b, d) question embeddings. candidates: (n, d) passage embeddings.
    positive: (b,) long, index into candidates of each question's positive.
    exclude: (b, n) bool, True where a candidate must not count as a negative for that
    question (a duplicate of its positive, a passage containing an answer); must be False
    at each question's positive. temperature: a float or a 0-dim tensor (learned), > 0.
    """
    b, n = q.shape[0], candidates.shape[0]
    assert positive.shape == (b,), f"positive must be ({b},), got {tuple(positive.shape)}"
    assert int(positive.min()) >= 0 and int(positive.max()) < n, f"positive index outside 0..{n - 1}"
    logits = similarity(q, candidates, score) / temperature  # (b, n)
    if exclude is not None:
        assert exclude.shape == (b, n) and exclude.dtype == torch.bool, \
            f"exclude must be bool ({b}, {n}), got {exclude.dtype} {tuple(exclude.shape)}"
        rows = torch.arange(b, device=q.device)
        assert not exclude[rows, positive].any(), "a question's positive is marked as excluded"
        logits = logits.masked_fill(exclude, float("-inf"))
    pos_logit = logits.gather(1, positive[:, None]).squeeze(1)  # (b,)
    return torch.logsumexp(logits, dim=1) - pos_logit


class LearnedTemperature(nn.Module):
    """tau = exp(-log_scale), learned, as CLIP's logit scale; clamped so 1/tau <= max_scale."""

    def __init__(self, init: float = 0.05, max_scale: float = 100.0):
        super().__init__()
        if init <= 0:
            raise ValueError(f"temperature must be > 0, got {init}")
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / init)))
        self.max_log_scale = math.log(max_scale)

    def forward(self) -> torch.Tensor:
        # clamp keeps the gradient inside the range and stops a runaway scale (CLIP uses 100)
        return torch.exp(-self.log_scale.clamp(max=self.max_log_scale))


# --- candidates from every process -------------------------------------------------------


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (rows may differ per process); backward returns the local rows
    of the gradient summed over every process, since every process's loss used them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        rank, world = _world()
        ctx.rank, ctx.sizes = rank, sizes
        longest = max(sizes)
        padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        # all_reduce rather than reduce_scatter: gloo (CPU) has no reduce_scatter, and the
        # gathered embeddings are small next to the encoders
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None


def _gather_sizes(n: int, device: torch.device) -> tuple[int, ...]:
    _, world = _world()
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine)
    return tuple(int(s) for s in sizes)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(n_local, ...) -> (n_all, ...) rows of every process in rank order, and the offset of
    this process's rows. Gradients flow back to the local rows; without a process group it
    returns x and 0."""
    rank, world = _world()
    if world == 1:
        return x, 0
    sizes = _gather_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes), sum(sizes[:rank])


def gather_nograd(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(n_local, ...) -> (n_all, ...) in rank order and this process's offset, no gradient
    (passage ids, flags)."""
    rank, world = _world()
    if world == 1:
        return x, 0
    sizes = _gather_sizes(x.shape[0], x.device)
    with torch.no_grad():
        return _GatherWithGrad.apply(x, sizes), sum(sizes[:rank])


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Mean of each gradient over processes: what DDP does, done by hand so that gradient
    caching's chunked backward and shared query/document weights need no DDP special cases."""
    _, world = _world()
    if world == 1:
        return
    for p in params:  # a parameter unused here may be used elsewhere: every process sends all
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, not one per tensor
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    start = 0
    for g in grads:
        g.copy_(flat[start: start + g.numel()].view_as(g))
        start += g.numel()


# --- backward, with or without gradient caching ------------------------------------------

Batch = tuple[torch.Tensor, torch.Tensor]  # input_ids (n, s), attention_mask (n, s)
Encode = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _RngState:
    """The RNG state before a forward pass, so a second pass draws the same dropout masks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _chunks(batch: Batch, size: int) -> list[Batch]:
    ids, mask = batch
    out = []
    for start in range(0, ids.shape[0], size):
        m = mask[start: start + size]
        s = int(m.sum(1).max())  # each chunk padded only to its own longest row
        out.append((ids[start: start + size, :s], m[:, :s]))
    return out


def contrastive_backward(encode_queries: Encode, encode_docs: Encode, queries: Batch, docs: Batch,
                         loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         chunk_size: Optional[int] = None) -> torch.Tensor:
    """Embed queries (b, s) and docs (n, s), compute loss_of(q (b, d), c (n, d)) -> scalar,
    and backpropagate it into the encoders. Returns the detached loss.

    chunk_size=None: one forward/backward over the whole batch (activations of all b + n
    sequences live at once). chunk_size=c: gradient caching. (1) embed everything without
    a graph, c rows at a time; (2) compute the loss on the embeddings as leaf tensors and
    backpropagate to them only, caching d loss / d embedding; (3) re-embed each chunk with a
    graph and backpropagate <embedding, cached gradient>. Dropout draws are replayed, so the
    gradients equal the plain ones; the cost is one extra forward pass.
    """
    if chunk_size is None:
        loss = loss_of(encode_queries(*queries), encode_docs(*docs))
        loss.backward()
        return loss.detach()
    if chunk_size < 1:
        raise ValueError(f"gradient-cache chunk size must be >= 1, got {chunk_size}")
    device = queries[0].device
    plan = [(encode_queries, c) for c in _chunks(queries, chunk_size)] + \
           [(encode_docs, c) for c in _chunks(docs, chunk_size)]
    states, embs = [], []
    with torch.no_grad():
        for encode, (ids, mask) in plan:
            states.append(_RngState(device))
            embs.append(encode(ids, mask))
    n_q = len(_chunks(queries, chunk_size))
    q = torch.cat(embs[:n_q]).requires_grad_()  # (b, d)
    c = torch.cat(embs[n_q:]).requires_grad_()  # (n, d)
    loss = loss_of(q, c)
    loss.backward()  # reaches q, c and any loss parameter (a learned temperature)
    cached = list(q.grad.split([e.shape[0] for e in embs[:n_q]])) + \
        list(c.grad.split([e.shape[0] for e in embs[n_q:]]))
    for (encode, (ids, mask)), state, grad in zip(plan, states, cached):
        with state.replay():
            emb = encode(ids, mask)  # (c, d), now with a graph
        emb.backward(grad)  # same as (emb * grad).sum().backward(), without the product
    return loss.detach()
