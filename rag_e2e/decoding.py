"""Decoding a RAG model: RAG-Token greedy/beam search, RAG-Sequence thorough and fast decoding.

Shapes: b questions, k retrieved passages, s source length, t generated length, v vocabulary,
w live beams, g groups searched side by side (b questions, or b*k (question, passage) rows).
The caller gives the generator inputs already assembled, `input_ids`/`attention_mask` (b*k, s)
with row i*k+j = question i with passage j, and `doc_scores` (b, k), the prior p(z|x) = softmax.

    RAG-Token:    search on log sum_z p(z|x) p(y_t|x,z,y<t), one token at a time.
    RAG-Sequence: beam search under each passage, union of hypotheses, then
                  thorough: log p(y|x,z) of every hypothesis under every passage (a passage's
                            own beam gives it for what it produced; the rest by teacher forcing
                            on the kept encoder states and cross-attention keys/values),
                  fast:     p(y|x,z) = 0 where passage z's beam did not produce y (the paper's shortcut),
                  and return argmax_y log sum_z p(z|x) p(y|x,z).

The encoder runs once per (question, passage) row; the decoder's KV cache lives on g*w*k rows and
follows the beams. The beam search reproduces transformers' (v5) beam search step for step (2*w
candidates, only the top w may finish, score / len**length_penalty, its early-stopping rules,
its logits processors) so that it can be checked against `RagTokenForGeneration.generate`.
Conventions:
  - `sequences` hold the generated tokens without the decoder start token, pad after eos;
  - RAG-Token scores are transformers' `sequences_scores`: forced tokens count log-prob 0;
  - RAG-Sequence ranks by log p(y|x) with no length penalty (the paper, transformers), and leaves
    a forced BOS (BART's `forced_bos_token_id`) out of it, as transformers' `exclude_bos_score`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from rag_e2e.marginalize import IGNORE, rag_token_logprobs

Mode = Literal["rag_token", "rag_sequence_thorough", "rag_sequence_fast", "greedy"]
NEG_INF = float("-inf")
# Thorough scoring holds logits for (pairs, t, v) at once; cap that at 2**26 floats (256 MB).
SCORE_LOGITS_BUDGET = 2**26


@dataclass
class DecodeConfig:
    mode: Mode = "rag_token"
    num_beams: int = 4  # per question (RAG-Token) or per (question, passage) (RAG-Sequence)
    max_new_tokens: int = 32
    min_new_tokens: int = 0  # eos is masked until this many tokens are out
    length_penalty: float = 1.0  # beam score = sum log p / len**length_penalty (as transformers)
    no_repeat_bos: bool = True  # BOS may only be the first generated token
    early_stopping: bool = True  # stop a question once num_beams hypotheses are finished

    def __post_init__(self) -> None:
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError(f"decode: num_beams and max_new_tokens must be >= 1, got {self}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"decode.min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")


@dataclass(frozen=True)
class SpecialTokens:
    start: int
    eos: int
    pad: int
    bos: int | None
    forced_bos: int | None
    forced_eos: int | None


def special_tokens(generator) -> SpecialTokens:
    """Token ids from the generator's generation config, falling back to its model config."""
    gen_cfg, cfg = getattr(generator, "generation_config", None), generator.config

    def pick(name: str, fallback: bool = True) -> int | None:
        value = getattr(gen_cfg, name, None)
        if value is None and (fallback or gen_cfg is None):
            value = getattr(cfg, name, None)
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ValueError(f"generator config: {name}={value}: only a single id is supported")
            value = value[0]
        return value

    start, eos, pad = pick("decoder_start_token_id"), pick("eos_token_id"), pick("pad_token_id")
    for name, value in (("decoder_start_token_id", start), ("eos_token_id", eos)):
        if value is None:
            raise ValueError(f"generator config has no {name}; decoding needs it")
    # forcing is a generation setting: where a generation config exists, its None means "off"
    return SpecialTokens(start, eos, eos if pad is None else pad, pick("bos_token_id"),
                         pick("forced_bos_token_id", False), pick("forced_eos_token_id", False))


@dataclass
class Candidates:
    """All RAG-Sequence hypotheses of one question: sequences (c, t), scores (c,) = log p(y|x),
    doc_logliks (c, k) = log p(y|x,z) (-inf where fast decoding assumes 0)."""

    sequences: torch.Tensor
    scores: torch.Tensor
    doc_logliks: torch.Tensor

    def posteriors(self, doc_scores: torch.Tensor) -> torch.Tensor:
        """p(z|x,y) for each candidate (provenance): doc_scores (k,) -> (c, k)."""
        return torch.softmax(F.log_softmax(doc_scores.float(), -1) + self.doc_logliks, dim=-1)


@dataclass
class DecodeOutput:
    sequences: torch.Tensor  # (b, t) generated ids, no decoder start, pad after eos
    scores: torch.Tensor  # (b,) the score that ranked them (see module docstring)
    candidates: list[Candidates] | None = None  # RAG-Sequence, when asked for


@dataclass
class BeamResult:
    """Finished hypotheses per group, best first: sequences (g, n, t); scores (g, n) as ranked
    (constrained log-probs / len**length_penalty, as transformers), -inf in unused slots; logprobs
    (g, n) the model's own log-likelihood (a forced BOS left out, a forced EOS counted); lengths (g, n)."""

    sequences: torch.Tensor
    scores: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Decode without dropout, and give the module back in the mode it came in."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def encode(generator, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The generator's encoder on every (question, passage) row, once: (n, s) -> (n, s, d)."""
    assert input_ids.shape == attention_mask.shape, f"{tuple(input_ids.shape)} vs {tuple(attention_mask.shape)}"
    out = generator.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    return out.last_hidden_state


class DecoderRows:
    """The generator's decoder on g groups x w beams x k passages rows over one encoding.

    With `use_cache` each step feeds only the newest token; the KV cache is reordered with the
    beams (`reorder`). Without it every step re-runs the decoder on the whole prefix.
    """

    def __init__(self, generator, hidden: torch.Tensor, mask: torch.Tensor, n_docs: int, use_cache: bool = True):
        assert hidden.shape[0] % n_docs == 0 and mask.shape == hidden.shape[:2]
        self.generator, self.k, self.use_cache = generator, n_docs, use_cache
        self.g = hidden.shape[0] // n_docs
        self.base, self.rows = (hidden, mask), {1: (hidden, mask)}
        self.cache, self.width = None, 1
        self.cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer, one per base row

    def _encoder_rows(self, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        if w not in self.rows:  # keep the base encoding and one expansion, never more
            h, m = self.base
            self.rows = {1: self.base, w: (repeat(h, "(g k) s d -> (g w k) s d", k=self.k, w=w),
                                          repeat(m, "(g k) s -> (g w k) s", k=self.k, w=w))}
        return self.rows[w]

    def logits(self, prefix: torch.Tensor) -> torch.Tensor:
        """Next-token logits for every row: prefix (g*w, L) with decoder start -> (g*w*k, v)."""
        w = prefix.shape[0] // self.g
        assert prefix.shape[0] == self.g * w, f"prefix rows {prefix.shape[0]} not a multiple of {self.g}"
        hidden, mask = self._encoder_rows(w)
        new = prefix[:, -1:] if self.use_cache and self.cache is not None else prefix
        out = self.generator(
            input_ids=None, attention_mask=mask, encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            decoder_input_ids=repeat(new, "n l -> (n k) l", k=self.k),
            past_key_values=self.cache, use_cache=self.use_cache,
        )
        if self.use_cache:
            if self.cache is None and w == 1 and isinstance(out.past_key_values, EncoderDecoderCache):
                # keep the cross-attention keys/values of every (question, passage) row for later passes
                cross = out.past_key_values.cross_attention_cache
                self.cross_kv = [(layer.keys, layer.values) for layer in cross.layers]
            self.cache, self.width = out.past_key_values, w
        return out.logits[:, -1].float()

    def reorder(self, parent: torch.Tensor) -> None:
        """Follow the beams: parent (g*w_new,) flat indices of the (g*w_old) rows they extend."""
        if not self.use_cache:
            return
        w_new = parent.shape[0] // self.g
        rows = (parent[:, None] * self.k + torch.arange(self.k, device=parent.device)).flatten()
        if w_new == self.width and isinstance(self.cache, EncoderDecoderCache):
            # Cross-attention keys/values depend on (question, passage) only, the same for every
            # beam of a question: only the self-attention part needs to move.
            self.cache.self_attention_cache.reorder_cache(rows)
        else:
            self.cache.reorder_cache(rows)
        self.width = w_new


def marginal_logprobs(logits: torch.Tensor, doc_scores: torch.Tensor) -> torch.Tensor:
    """log sum_z p(z|x) p(v|x,z,y<t): logits (g*w*k, v), doc_scores (g, k) -> (g, w, v)."""
    g, k = doc_scores.shape
    assert logits.dim() == 2 and logits.shape[0] % (g * k) == 0, f"logits {tuple(logits.shape)} vs g={g}, k={k}"
    if k == 1:  # one passage (RAG-Sequence's per-passage beams): nothing to marginalise
        return F.log_softmax(rearrange(logits, "(g w) v -> g w v", g=g), dim=-1)
    per_doc = rearrange(logits, "(g w k) v -> g k w v", g=g, k=k)
    return rag_token_logprobs(per_doc, doc_scores)  # the training objective's own marginal


def constrain_logprobs(lp: torch.Tensor, step: int, tok: SpecialTokens, cfg: DecodeConfig) -> torch.Tensor:
    """transformers' logits processors, in its order: min length, (no BOS repeat), forced BOS/EOS.

    lp (..., v) at generation step `step` (0 = first generated token) -> (..., v).
    """
    lp = lp.clone()
    if step < cfg.min_new_tokens:
        lp[..., tok.eos] = NEG_INF
    if cfg.no_repeat_bos and step > 0 and tok.bos is not None:
        lp[..., tok.bos] = NEG_INF
    forced = tok.forced_bos if step == 0 else None
    if step == cfg.max_new_tokens - 1 and tok.forced_eos is not None:
        forced = tok.forced_eos
    if forced is not None:
        lp.fill_(NEG_INF)
        lp[..., forced] = 0.0
    return lp


def _step_logprobs(rows: DecoderRows, prefix, doc_scores, step: int, tok: SpecialTokens, cfg: DecodeConfig):
    """Next-token log-probs that steer the search (constrained) and that score it (the model's):
    prefix (g*w, step+1), doc_scores (g, k) -> two (g, w, v)."""
    raw = marginal_logprobs(rows.logits(prefix), doc_scores)
    lp = constrain_logprobs(raw, step, tok, cfg)
    if step == 0 and tok.forced_bos is not None:
        raw = torch.zeros_like(raw)  # a forced BOS was not chosen: it is not scored (exclude_bos_score)
    return lp, raw


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (g, n, ...) indexed along dim 1 by idx (g, m) -> (g, m, ...)."""
    return x.gather(1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:]))


@dataclass
class _Beams:
    seqs: torch.Tensor  # (g, w, T) running hypotheses
    run: torch.Tensor  # (g, w) their summed constrained log-probs (what ranks them)
    raw: torch.Tensor  # (g, w) their log-likelihood under the model
    fin: BeamResult  # (g, n) finished ones, best first
    open: torch.Tensor  # (g,) can a running beam still beat the finished ones?


def _finish(st: _Beams, seqs, sums, raw, done, step: int, cfg: DecodeConfig, n: int) -> None:
    """Merge this step's finished candidates (only the top n may finish) into st.fin."""
    g, m = sums.shape
    full = torch.isfinite(st.fin.scores).all(-1)
    ok = done & (torch.arange(m, device=sums.device) < n) & torch.isfinite(sums)
    ok &= st.open[:, None] & ~(full & cfg.early_stopping)[:, None]
    scores = torch.where(ok, sums / (step + 1) ** cfg.length_penalty, NEG_INF)
    lens = torch.full_like(done, step + 1, dtype=torch.long)
    merged = BeamResult(torch.cat([st.fin.sequences, seqs], 1), torch.cat([st.fin.scores, scores], 1),
                        torch.cat([st.fin.logprobs, raw], 1), torch.cat([st.fin.lengths, lens], 1))
    best = merged.scores.topk(n, dim=1).indices
    st.fin = BeamResult(*(_take(x, best) for x in (merged.sequences, merged.scores, merged.logprobs, merged.lengths)))


def _beam_step(st: _Beams, lp, raw, step: int, tok: SpecialTokens, cfg: DecodeConfig, n: int):
    """One beam step on log-probs lp, raw (g, w, v); returns the parents (g, w') of the new beams."""
    g, w, v = lp.shape
    cand = (lp + st.run[..., None]).reshape(g, w * v)
    sums, idx = cand.topk(min(2 * n, w * v), dim=1)  # (g, m): 2n so that n can go on if n finish
    raw = (raw + st.raw[..., None]).reshape(g, w * v).gather(1, idx)
    parent, token = idx // v, idx % v
    seqs = _take(st.seqs, parent).clone()
    seqs[:, :, step] = token
    done = (token == tok.eos) | (step + 1 >= cfg.max_new_tokens)
    # transformers gives finished candidates -1e9 and lets them fill a short beam, where they can
    # later "finish" as garbage (a tiny vocabulary, forced tokens); -inf keeps them out for good.
    running = sums.masked_fill(done, NEG_INF)
    keep = running.topk(min(n, running.shape[1]), dim=1).indices
    _finish(st, seqs, sums, raw, done, step, cfg, n)
    st.seqs, st.run, st.raw = _take(seqs, keep), _take(running, keep), _take(raw, keep)
    full = torch.isfinite(st.fin.scores).all(-1)
    best_running = st.run[:, 0] / (step + 1) ** cfg.length_penalty
    st.open &= ~full | (best_running > st.fin.scores.min(-1).values)
    stop = (~st.open).all() or (cfg.early_stopping and full.all()) or done.all()
    return _take(parent, keep), bool(stop)


def beam_search(rows: DecoderRows, doc_scores: torch.Tensor, tok: SpecialTokens, cfg: DecodeConfig) -> BeamResult:
    """Beam search on the marginal over k passages, for g groups: doc_scores (g, k).

    Returns cfg.num_beams finished hypotheses per group (BeamResult, best first).
    """
    g, n, T = doc_scores.shape[0], cfg.num_beams, cfg.max_new_tokens
    dev = doc_scores.device
    empty = torch.full((g, n), NEG_INF, device=dev)
    st = _Beams(seqs=torch.full((g, 1, T), tok.pad, dtype=torch.long, device=dev),
                run=torch.zeros(g, 1, device=dev), raw=torch.zeros(g, 1, device=dev),
                fin=BeamResult(torch.full((g, n, T), tok.pad, dtype=torch.long, device=dev), empty,
                               empty.clone(), torch.zeros(g, n, dtype=torch.long, device=dev)),
                open=torch.ones(g, dtype=torch.bool, device=dev))
    for step in range(T):
        w = st.seqs.shape[1]
        start = torch.full((g * w, 1), tok.start, dtype=torch.long, device=dev)
        prefix = torch.cat([start, st.seqs[:, :, :step].reshape(g * w, step)], 1)  # (g*w, step+1)
        lp, raw = _step_logprobs(rows, prefix, doc_scores, step, tok, cfg)
        parent, stop = _beam_step(st, lp, raw, step, tok, cfg, n)
        if stop:
            break
        rows.reorder((parent + w * torch.arange(g, device=dev)[:, None]).flatten())
    t = max(int(st.fin.lengths.max()), 1)
    return BeamResult(st.fin.sequences[:, :, :t], st.fin.scores, st.fin.logprobs, st.fin.lengths)


def greedy_search(rows: DecoderRows, doc_scores: torch.Tensor, tok: SpecialTokens, cfg: DecodeConfig) -> BeamResult:
    """Argmax of the marginal at every step, for g groups: doc_scores (g, k) -> BeamResult with n=1."""
    g, T, dev = doc_scores.shape[0], cfg.max_new_tokens, doc_scores.device
    seqs = torch.full((g, T), tok.pad, dtype=torch.long, device=dev)
    sums, raw_sums = torch.zeros(g, device=dev), torch.zeros(g, device=dev)
    lens = torch.zeros(g, dtype=torch.long, device=dev)
    done = torch.zeros(g, dtype=torch.bool, device=dev)
    prefix = torch.full((g, 1), tok.start, dtype=torch.long, device=dev)
    for step in range(T):
        lp, raw = (x[:, 0] for x in _step_logprobs(rows, prefix, doc_scores, step, tok, cfg))
        best, token = lp.max(dim=-1)  # (g,)
        raw_sums += torch.where(done, 0.0, raw.gather(1, token[:, None]).squeeze(1))
        token = torch.where(done, tok.pad, token)  # finished rows are fed pad, as transformers does
        sums += torch.where(done, 0.0, best)
        lens += (~done).long()
        seqs[:, step] = token
        done |= token == tok.eos
        prefix = torch.cat([prefix, token[:, None]], 1)
        if done.all():
            break
    scores = sums / lens.float() ** cfg.length_penalty
    t = int(lens.max())
    return BeamResult(seqs[:, None, :t], scores[:, None], raw_sums[:, None], lens[:, None])


def _check_inputs(input_ids, attention_mask, doc_scores, n_docs: int) -> int:
    b = doc_scores.shape[0]
    assert doc_scores.shape == (b, n_docs), f"doc_scores must be (b, k={n_docs}), got {tuple(doc_scores.shape)}"
    assert input_ids.shape[0] == b * n_docs, f"input_ids must be (b*k={b * n_docs}, s), got {tuple(input_ids.shape)}"
    assert attention_mask.shape == input_ids.shape, "attention_mask must match input_ids"
    return b


def rag_token_decode(generator, input_ids, attention_mask, doc_scores, n_docs: int, cfg: DecodeConfig,
                     greedy: bool = False, use_cache: bool = True) -> DecodeOutput:
    """RAG-Token beam search (or greedy): input_ids/attention_mask (b*k, s), doc_scores (b, k).

    Returns sequences (b, t) and scores (b,) = log p(y|x) / len**length_penalty, where forced
    tokens count log-prob 0 (transformers' sequences_scores).
    """
    _check_inputs(input_ids, attention_mask, doc_scores, n_docs)
    tok = special_tokens(generator)
    with eval_mode(generator):
        rows = DecoderRows(generator, encode(generator, input_ids, attention_mask), attention_mask, n_docs, use_cache)
        res = (greedy_search if greedy else beam_search)(rows, doc_scores.float(), tok, cfg)
    t = max(int(res.lengths[:, 0].max()), 1)
    return DecodeOutput(sequences=res.sequences[:, 0, :t], scores=res.scores[:, 0])


def _union(beams: BeamResult, b: int, k: int) -> list[dict[tuple, list[float]]]:
    """Per question: unique hypothesis -> (k,) log p(y|x,z) from the beams (-inf if z's beam missed y)."""
    seqs = rearrange(beams.sequences, "(b k) n t -> b k n t", k=k).tolist()
    lps = rearrange(beams.logprobs, "(b k) n -> b k n", k=k).tolist()
    lens = rearrange(beams.lengths, "(b k) n -> b k n", k=k).tolist()
    ok = rearrange(torch.isfinite(beams.scores), "(b k) n -> b k n", k=k).tolist()
    out = []
    for i in range(b):
        hyps: dict[tuple, list[float]] = {}  # insertion order: passage 0's beams first, as transformers
        for z in range(k):
            for seq, lp, n, good in zip(seqs[i][z], lps[i][z], lens[i][z], ok[i][z]):
                if good:
                    ll = hyps.setdefault(tuple(seq[:n]), [NEG_INF] * k)
                    ll[z] = max(ll[z], lp)
        out.append(hyps)
    return out


def _cross_cache(cross_kv, rows: torch.Tensor) -> EncoderDecoderCache | None:
    """A decoder cache holding only precomputed cross-attention keys/values for `rows`: the decoder then
    skips projecting the encoder states again for every scored (candidate, passage) pair."""
    if cross_kv is None:
        return None
    cross = DynamicCache()
    for i, (keys, values) in enumerate(cross_kv):
        cross.update(keys[rows], values[rows], i)
    return EncoderDecoderCache(DynamicCache(), cross)


def score_pairs(generator, hidden, mask, rows: torch.Tensor, cands: torch.Tensor, lens: torch.Tensor,
                tok: SpecialTokens, cross_kv=None) -> torch.Tensor:
    """Teacher-forced log p(y|x,z) of candidates under passages, reusing the encoding.

    hidden (n, s, d), mask (n, s) for the n (question, passage) rows, and optionally their
    cross-attention keys/values (`DecoderRows.cross_kv`); pair p reads row rows[p] with candidate
    cands[p] (ids (p, t)) of length lens[p]. Returns (p,). A forced BOS is not scored (it was not
    chosen). Pairs of one length go together (no padding), at most SCORE_LOGITS_BUDGET logits a pass.
    """
    v = generator.config.vocab_size
    labels = cands.clone()
    if tok.forced_bos is not None:
        labels[:, 0] = IGNORE
    dec_in = torch.cat([torch.full_like(cands[:, :1], tok.start), cands[:, :-1]], 1)  # (p, t)
    out = torch.empty(cands.shape[0], device=hidden.device)
    for t in lens.unique().tolist():
        same = (lens == t).nonzero().squeeze(1)
        for sel in same.split(max(1, SCORE_LOGITS_BUDGET // (t * v))):
            r = rows[sel]
            logits = generator(
                input_ids=None, attention_mask=mask[r], encoder_outputs=BaseModelOutput(last_hidden_state=hidden[r]),
                decoder_input_ids=dec_in[sel, :t], past_key_values=_cross_cache(cross_kv, r),
                use_cache=cross_kv is not None,
            ).logits.float()  # (n, t, v)
            lab = labels[sel, :t]
            # gather - logsumexp: log_softmax's value at the label, without writing (n, t, v) again
            tok_lp = logits.gather(-1, lab.clamp(min=0)[..., None]).squeeze(-1) - logits.logsumexp(-1)  # (n, t)
            out[sel] = (tok_lp * (lab != IGNORE)).sum(-1)
    return out


def rag_sequence_decode(generator, input_ids, attention_mask, doc_scores, n_docs: int, cfg: DecodeConfig,
                        thorough: bool = True, return_candidates: bool = False,
                        use_cache: bool = True) -> DecodeOutput:
    """RAG-Sequence decoding: input_ids/attention_mask (b*k, s), doc_scores (b, k).

    Returns the best hypothesis per question (b, t) and its log p(y|x) (b,), optionally every
    candidate with log p(y|x) and per-passage log p(y|x,z).
    """
    b = _check_inputs(input_ids, attention_mask, doc_scores, n_docs)
    tok, dev = special_tokens(generator), input_ids.device
    doc_lp = F.log_softmax(doc_scores.float(), dim=-1)  # (b, k)
    with eval_mode(generator):
        hidden = encode(generator, input_ids, attention_mask)
        # every (question, passage) row is its own group with one "passage" of prior 1
        rows = DecoderRows(generator, hidden, attention_mask, 1, use_cache)
        beams = beam_search(rows, torch.zeros(b * n_docs, 1, device=dev), tok, cfg)
        hyps = _union(beams, b, n_docs)
        qidx = torch.tensor([i for i, h in enumerate(hyps) for _ in h], dtype=torch.long, device=dev)
        flat = [torch.tensor(s, dtype=torch.long) for h in hyps for s in h]
        lens = torch.tensor([len(s) for s in flat], dtype=torch.long, device=dev)
        cands = torch.nn.utils.rnn.pad_sequence(flat, batch_first=True, padding_value=tok.pad).to(dev)
        logliks = torch.tensor([ll for h in hyps for ll in h.values()], device=dev)  # (c, k), -inf: z's beam missed y
        if thorough:
            # the beams already hold log p(y|x,z) for the passage that produced y; score the rest
            c_idx, z = (~torch.isfinite(logliks)).nonzero(as_tuple=True)
            logliks[c_idx, z] = score_pairs(generator, hidden, attention_mask, qidx[c_idx] * n_docs + z,
                                            cands[c_idx], lens[c_idx], tok, rows.cross_kv)
    marginal = torch.logsumexp(doc_lp[qidx] + logliks, dim=-1)  # (c,) = log p(y|x)
    return _pick_best(b, qidx, cands, lens, marginal, logliks, tok, return_candidates)


def _pick_best(b, qidx, cands, lens, marginal, logliks, tok: SpecialTokens, return_candidates: bool) -> DecodeOutput:
    """argmax_y log p(y|x) per question; candidates (c, t) of questions qidx (c,)."""
    best, scores, per_question = [], [], []
    for i in range(b):
        sel = (qidx == i).nonzero().squeeze(1)
        j = sel[marginal[sel].argmax()]
        best.append(cands[j, : lens[j]])
        scores.append(marginal[j])
        if return_candidates:
            t = int(lens[sel].max())
            per_question.append(Candidates(cands[sel, :t], marginal[sel], logliks[sel]))
    seqs = torch.nn.utils.rnn.pad_sequence(best, batch_first=True, padding_value=tok.pad)
    return DecodeOutput(seqs, torch.stack(scores), per_question if return_candidates else None)


def generate(generator, input_ids: torch.Tensor, attention_mask: torch.Tensor, doc_scores: torch.Tensor,
             n_docs: int, mode: Mode | None = None, cfg: DecodeConfig | None = None,
             return_candidates: bool = False) -> DecodeOutput:
    """Decode b questions with k passages each: input_ids/attention_mask (b*k, s), doc_scores (b, k).

    mode (default cfg.mode): "rag_token" (beam search on the marginal), "greedy" (RAG-Token
    greedy), "rag_sequence_thorough", "rag_sequence_fast". Returns sequences (b, t), scores (b,).
    """
    cfg = cfg or DecodeConfig()
    mode = mode or cfg.mode
    if mode in ("rag_token", "greedy"):
        return rag_token_decode(generator, input_ids, attention_mask, doc_scores, n_docs, cfg,
                                greedy=mode == "greedy")
    if mode in ("rag_sequence_thorough", "rag_sequence_fast"):
        return rag_sequence_decode(generator, input_ids, attention_mask, doc_scores, n_docs, cfg,
                                   thorough=mode == "rag_sequence_thorough", return_candidates=return_candidates)
    raise ValueError(f"decode mode {mode!r} is not one of rag_token, greedy, rag_sequence_thorough, rag_sequence_fast")
