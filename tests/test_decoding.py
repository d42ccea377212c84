"""RAG decoders against enumeration, the training objectives, a naive loop and transformers' RAG.

Tiny random BARTs (and one T5; vocab 8-16, d_model 16, one layer) with a large init scale, so that
the next token depends on the passage and near-ties (which would make comparisons flaky) are rare.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from rag_e2e.config import ConfigError, from_dict
from rag_e2e.decoding import (
    DecodeConfig,
    generate,
    rag_sequence_decode,
    rag_token_decode,
    special_tokens,
)
from rag_e2e.marginalize import rag_sequence_nll, rag_token_nll

BOS, PAD, EOS = 0, 1, 2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads and lose a lot on a busy machine; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_bart(vocab=12, seed=0, forced_bos=None, forced_eos=None, std=0.5):
    torch.manual_seed(seed)
    cfg = BartConfig(
        vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
        init_std=std, dropout=0.0,
    )
    model = BartForConditionalGeneration(cfg).eval()
    model.generation_config.forced_bos_token_id = forced_bos
    model.generation_config.forced_eos_token_id = forced_eos
    return model


def contexts(b, k, s, vocab, seed=0, ragged=True):
    """(b*k, s) ids right-padded to random lengths, their mask, and doc scores (b, k)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b * k, s), generator=g)
    lens = torch.randint(s // 2, s + 1, (b * k,), generator=g) if ragged else torch.full((b * k,), s)
    mask = (torch.arange(s)[None] < lens[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD)
    return ids, mask, torch.randn(b, k, generator=g) * 2


def labels_of(seqs, lens, skip_first=False):
    """Generated ids (n, t) with lengths (n,) -> labels, -100 after the end (and on a forced BOS)."""
    labels = torch.where(torch.arange(seqs.shape[1])[None] < lens[:, None], seqs, -100)
    if skip_first:
        labels[:, 0] = -100
    return labels


def teacher_logits(model, ids, mask, labels, k):
    """Full forward (encoder included) of label sequences (n, t) of question rows (n*k, s) -> (n, k, t, v)."""
    dec_in = torch.cat([torch.full_like(labels[:, :1], EOS), labels[:, :-1].clamp(min=0)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in.repeat_interleave(k, 0)).logits
    return logits.view(labels.shape[0], k, *logits.shape[1:])


def lengths(seqs):
    """Length up to and including the first eos (or the full width)."""
    is_eos = seqs == EOS
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, seqs.shape[1])
    return first


def rows_of(ids, mask, i, k, n):
    """Question i's k rows repeated for n label sequences: (n*k, s)."""
    sl = slice(i * k, (i + 1) * k)
    return ids[sl].repeat(n, 1), mask[sl].repeat(n, 1)


PLAIN = dict(no_repeat_bos=False, early_stopping=True)


def test_greedy_is_stepwise_argmax_of_marginal():
    model, b, k = tiny_bart(vocab=12, seed=1), 3, 3
    ids, mask, ds = contexts(b, k, 9, 12, seed=1)
    cfg = DecodeConfig(max_new_tokens=6, **PLAIN)
    out = generate(model, ids, mask, ds, k, "greedy", cfg)
    lens = lengths(out.sequences)
    labels = labels_of(out.sequences, lens)
    logits = teacher_logits(model, ids, mask, labels, k)  # (b, k, t, v)
    marg = torch.logsumexp(F.log_softmax(ds, -1)[:, :, None, None] + F.log_softmax(logits, -1), dim=1)
    for i in range(b):
        assert torch.equal(marg[i, : lens[i]].argmax(-1), out.sequences[i, : lens[i]])
    expected = -rag_token_nll(logits, ds, labels) / lens.float()
    torch.testing.assert_close(out.scores, expected, atol=1e-5, rtol=1e-5)


def naive_greedy(model, ids, mask, ds, k, steps):
    """Re-runs the whole generator on the whole prefix each step; no cache, no shared code."""
    b = ds.shape[0]
    prefix = torch.full((b, 1), EOS)
    done = torch.zeros(b, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=prefix.repeat_interleave(k, 0)).logits
            lp = F.log_softmax(logits[:, -1], -1).view(b, k, -1)
            nxt = torch.logsumexp(F.log_softmax(ds, -1)[..., None] + lp, 1).argmax(-1)
            nxt = torch.where(done, PAD, nxt)
            done |= nxt == EOS
            prefix = torch.cat([prefix, nxt[:, None]], 1)
            if done.all():
                break
    return prefix[:, 1:]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kv_cache_matches_no_cache_and_naive_loop(seed):
    model, b, k = tiny_bart(vocab=12, seed=seed), 3, 3
    ids, mask, ds = contexts(b, k, 9, 12, seed=seed)
    cfg = DecodeConfig(max_new_tokens=7, num_beams=3, **PLAIN)
    greedy = rag_token_decode(model, ids, mask, ds, k, cfg, greedy=True)
    assert torch.equal(greedy.sequences, naive_greedy(model, ids, mask, ds, k, 7))
    for kw in (dict(greedy=True), dict(greedy=False)):
        cached = rag_token_decode(model, ids, mask, ds, k, cfg, use_cache=True, **kw)
        plain = rag_token_decode(model, ids, mask, ds, k, cfg, use_cache=False, **kw)
        assert torch.equal(cached.sequences, plain.sequences)
        torch.testing.assert_close(cached.scores, plain.scores)
    for thorough in (True, False):
        cached = rag_sequence_decode(model, ids, mask, ds, k, cfg, thorough, return_candidates=True)
        plain = rag_sequence_decode(model, ids, mask, ds, k, cfg, thorough, return_candidates=True, use_cache=False)
        assert torch.equal(cached.sequences, plain.sequences)
        for a, c in zip(cached.candidates, plain.candidates):
            assert torch.equal(a.sequences, c.sequences)
            torch.testing.assert_close(a.doc_logliks, c.doc_logliks)


@pytest.mark.parametrize("seed", [0, 3])
def test_beam_of_one_equals_greedy(seed):
    model, b, k = tiny_bart(vocab=14, seed=seed), 4, 2
    ids, mask, ds = contexts(b, k, 8, 14, seed=seed)
    cfg = DecodeConfig(max_new_tokens=8, num_beams=1, **PLAIN)
    beam = rag_token_decode(model, ids, mask, ds, k, cfg)
    greedy = rag_token_decode(model, ids, mask, ds, k, cfg, greedy=True)
    assert torch.equal(beam.sequences, greedy.sequences)
    torch.testing.assert_close(beam.scores, greedy.scores)


def enumerate_sequences(vocab, max_len):
    """Every sequence the decoder can produce: ends with its first eos, or is max_len long."""
    seqs = []
    for n in range(1, max_len + 1):
        for body in itertools.product([v for v in range(vocab) if v != EOS], repeat=n - 1):
            seqs.append(list(body) + [EOS])
            if n == max_len:
                seqs.extend(list(body) + [v] for v in range(vocab) if v != EOS)
    padded = torch.tensor([s + [PAD] * (max_len - len(s)) for s in seqs])
    return padded, torch.tensor([len(s) for s in seqs])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_rag_token_beam_finds_enumerated_best(length_penalty):
    vocab, max_len, k = 8, 3, 2
    model = tiny_bart(vocab=vocab, seed=4)
    ids, mask, ds = contexts(2, k, 7, vocab, seed=4)
    seqs, lens = enumerate_sequences(vocab, max_len)
    labels = labels_of(seqs, lens)
    # wider than the number of prefixes at every step: the search is exhaustive
    cfg = DecodeConfig(max_new_tokens=max_len, num_beams=vocab ** (max_len - 1), length_penalty=length_penalty,
                       **PLAIN)
    out = rag_token_decode(model, ids, mask, ds, k, cfg)
    for i in range(2):
        q_ids, q_mask = rows_of(ids, mask, i, k, len(seqs))
        logits = teacher_logits(model, q_ids, q_mask, labels, k)
        score = -rag_token_nll(logits, ds[i : i + 1].expand(len(seqs), k), labels) / lens.float() ** length_penalty
        best = score.argmax()
        assert torch.equal(out.sequences[i, : lens[best]], seqs[best, : lens[best]])
        torch.testing.assert_close(out.scores[i], score[best], atol=1e-5, rtol=1e-5)


def passage_beams_by_transformers(model, ids, mask, cfg):
    """transformers' own beam search under each (question, passage) row: (b*k*n, t) hypotheses."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, num_beams=cfg.num_beams, num_return_sequences=cfg.num_beams,
            max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens, length_penalty=cfg.length_penalty,
            early_stopping=cfg.early_stopping,
        )
    return out[:, 1:]  # drop the decoder start


def test_rag_sequence_candidates_scores_and_provenance():
    vocab, b, k, n = 12, 2, 3, 3
    model = tiny_bart(vocab=vocab, seed=5, forced_bos=BOS, forced_eos=EOS)
    with torch.no_grad():  # let some hypotheses end before the forced eos
        model.final_logits_bias[0, EOS] = 3.0
    ids, mask, ds = contexts(b, k, 9, vocab, seed=5)
    cfg = DecodeConfig(max_new_tokens=5, num_beams=n, **PLAIN)
    thorough = generate(model, ids, mask, ds, k, "rag_sequence_thorough", cfg, return_candidates=True)
    fast = generate(model, ids, mask, ds, k, "rag_sequence_fast", cfg, return_candidates=True)
    hf = passage_beams_by_transformers(model, ids, mask, cfg).view(b, k, n, -1)
    assert len(set(lengths(hf.flatten(0, 2)).tolist())) > 1
    for i in range(b):
        # the candidates: the union of the per-passage beams, deduplicated, in order of appearance
        produced_by = {}
        for z, j in itertools.product(range(k), range(n)):
            produced_by.setdefault(tuple(hf[i, z, j, : lengths(hf[i, z, j][None])[0]].tolist()), set()).add(z)
        seqs = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in produced_by], True, PAD)
        for out in (thorough, fast):
            c = out.candidates[i]
            assert torch.equal(c.sequences, seqs)
            best = c.scores.argmax()
            n_best = lengths(c.sequences[best][None])[0]
            assert torch.equal(out.sequences[i, :n_best], c.sequences[best, :n_best])
            assert (out.sequences[i, n_best:] == PAD).all()
            torch.testing.assert_close(out.scores[i], c.scores[best])
        # thorough: every candidate under every passage; log p(y|x) == -rag_sequence_nll (forced BOS not scored)
        c, m = thorough.candidates[i], len(seqs)
        labels = labels_of(seqs, lengths(seqs), skip_first=True)
        logits = teacher_logits(model, *rows_of(ids, mask, i, k, m), labels, k)  # (m, k, t, v)
        nll = rag_sequence_nll(logits, ds[i : i + 1].expand(m, k), labels)
        torch.testing.assert_close(c.scores, -nll, atol=1e-5, rtol=1e-5)
        per_doc = torch.stack([-rag_sequence_nll(logits[:, z : z + 1], ds[i : i + 1, z : z + 1].expand(m, 1), labels)
                               for z in range(k)], 1)  # (m, k) log p(y|x,z)
        torch.testing.assert_close(c.doc_logliks, per_doc, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c.posteriors(ds[i]).sum(-1), torch.ones(m))
        # fast: p(y|x,z) = 0 unless z's beam produced y
        was_produced = torch.tensor([[z in zs for z in range(k)] for zs in produced_by.values()])
        fast_ll = per_doc.masked_fill(~was_produced, float("-inf"))
        torch.testing.assert_close(fast.candidates[i].doc_logliks, fast_ll, atol=1e-5, rtol=1e-5)
        fast_marg = torch.logsumexp(F.log_softmax(ds[i], -1) + fast_ll, -1)
        torch.testing.assert_close(fast.candidates[i].scores, fast_marg, atol=1e-5, rtol=1e-5)


def test_batch_questions_finish_at_different_lengths():
    vocab, b, k = 12, 4, 3
    model = tiny_bart(vocab=vocab, seed=6)
    with torch.no_grad():
        model.final_logits_bias[0, EOS] = 1.0
    ids, mask, ds = contexts(b, k, 10, vocab, seed=6)
    cfg = DecodeConfig(max_new_tokens=8, num_beams=3, **PLAIN)
    for mode in ("rag_token", "greedy", "rag_sequence_thorough", "rag_sequence_fast"):
        batch = generate(model, ids, mask, ds, k, mode, cfg)
        lens = lengths(batch.sequences)
        assert len(set(lens.tolist())) > 1, f"{mode}: pick a seed where lengths differ"
        for i in range(b):
            rows = slice(i * k, (i + 1) * k)
            s = int(mask[rows].sum(1).max())  # the question alone, its padding trimmed
            alone = generate(model, ids[rows, :s], mask[rows, :s], ds[i : i + 1], k, mode, cfg)
            assert torch.equal(alone.sequences[0], batch.sequences[i, : alone.sequences.shape[1]])
            assert (batch.sequences[i, lens[i] :] == PAD).all()
            torch.testing.assert_close(alone.scores[0], batch.scores[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["rag_token", "greedy", "rag_sequence_thorough"])
def test_min_new_tokens_masks_eos(mode):
    vocab, k = 12, 2
    model = tiny_bart(vocab=vocab, seed=7)
    with torch.no_grad():
        model.final_logits_bias[0, EOS] = 8.0  # eos is the favourite from the start
    ids, mask, ds = contexts(3, k, 8, vocab, seed=7)
    quick = generate(model, ids, mask, ds, k, mode, DecodeConfig(max_new_tokens=6, **PLAIN))
    assert (lengths(quick.sequences) < 4).all()
    out = generate(model, ids, mask, ds, k, mode, DecodeConfig(max_new_tokens=6, min_new_tokens=3, **PLAIN))
    lens = lengths(out.sequences)
    assert (lens >= 4).all() and (out.sequences.gather(1, lens[:, None] - 1) == EOS).all()


@pytest.mark.parametrize("mode", ["rag_token", "greedy", "rag_sequence_fast"])
def test_no_repeat_bos(mode):
    vocab, k = 12, 2
    model = tiny_bart(vocab=vocab, seed=7)
    with torch.no_grad():
        model.final_logits_bias[0, BOS] = 4.0  # BOS is the favourite at every step
    ids, mask, ds = contexts(3, k, 8, vocab, seed=7)
    free = generate(model, ids, mask, ds, k, mode, DecodeConfig(max_new_tokens=5, no_repeat_bos=False))
    assert (free.sequences[:, 1:] == BOS).any()
    guarded = generate(model, ids, mask, ds, k, mode, DecodeConfig(max_new_tokens=5, no_repeat_bos=True))
    assert not (guarded.sequences[:, 1:] == BOS).any()


def test_forced_tokens_and_special_ids():
    model = tiny_bart(vocab=12, seed=8, forced_bos=BOS, forced_eos=EOS)
    tok = special_tokens(model)
    assert (tok.start, tok.eos, tok.pad, tok.bos, tok.forced_bos, tok.forced_eos) == (EOS, EOS, PAD, BOS, BOS, EOS)
    ids, mask, ds = contexts(2, 2, 8, 12, seed=8)
    for mode in ("rag_token", "greedy", "rag_sequence_fast"):
        out = generate(model, ids, mask, ds, 2, mode, DecodeConfig(max_new_tokens=4))
        assert (out.sequences[:, 0] == BOS).all()
        assert (out.sequences.gather(1, lengths(out.sequences)[:, None] - 1) == EOS).all()


def tiny_rag(cls, generator, n_docs):
    qcfg = DPRConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    rcfg = RagConfig.from_question_encoder_generator_configs(qcfg, generator.config, n_docs=n_docs)
    rag = cls(config=rcfg, question_encoder=DPRQuestionEncoder(qcfg), generator=generator).eval()
    if isinstance(rag, RagTokenForGeneration):  # RagSequence decodes with the generator's own config
        rag.generation_config.forced_bos_token_id = generator.generation_config.forced_bos_token_id
    return rag


@pytest.mark.parametrize(
    "beams,lp,early,min_new", [(3, 1.0, True, 0), (4, 2.0, False, 2), (2, 0.5, True, 1)]
)
def test_rag_token_beam_equals_transformers(beams, lp, early, min_new):
    vocab, b, k = 16, 3, 3
    model = tiny_bart(vocab=vocab, seed=9, forced_bos=BOS, forced_eos=EOS)
    with torch.no_grad():  # some beams end early, some at the forced eos
        model.final_logits_bias[0, EOS] = 3.0
    ids, mask, ds = contexts(b, k, 10, vocab, seed=9)
    cfg = DecodeConfig(num_beams=beams, max_new_tokens=6, min_new_tokens=min_new, length_penalty=lp,
                       early_stopping=early, no_repeat_bos=False)
    ours = generate(model, ids, mask, ds, k, "rag_token", cfg)
    rag = tiny_rag(RagTokenForGeneration, model, k)
    with torch.no_grad():
        theirs = rag.generate(
            context_input_ids=ids, context_attention_mask=mask, doc_scores=ds, n_docs=k, num_beams=beams,
            max_length=7,  # RagTokenForGeneration.generate ignores max_new_tokens
            min_new_tokens=min_new, length_penalty=lp, early_stopping=early,
            output_scores=True, return_dict_in_generate=True,
        )
    seqs = theirs.sequences[:, 1:]
    assert torch.equal(ours.sequences, seqs[:, : ours.sequences.shape[1]])
    assert (seqs[:, ours.sequences.shape[1] :] == PAD).all()
    torch.testing.assert_close(ours.scores, theirs.sequences_scores, atol=1e-5, rtol=1e-5)


def test_rag_sequence_thorough_equals_transformers():
    vocab, b, k = 16, 3, 3
    model = tiny_bart(vocab=vocab, seed=10, forced_bos=BOS, forced_eos=EOS)
    # unpadded: transformers' RagSequence beams run with attention_mask=None, and v5 generate() infers
    # no encoder mask for encoder-decoders, so on padded inputs its beams read the padding
    ids, mask, ds = contexts(b, k, 10, vocab, seed=10, ragged=False)
    cfg = DecodeConfig(num_beams=3, max_new_tokens=6, no_repeat_bos=False)
    ours = generate(model, ids, mask, ds, k, "rag_sequence_thorough", cfg)
    rag = tiny_rag(RagSequenceForGeneration, model, k)
    with torch.no_grad():
        theirs = rag.generate(context_input_ids=ids, context_attention_mask=mask, doc_scores=ds, n_docs=k,
                              num_beams=3, max_new_tokens=6, early_stopping=True)
    theirs = theirs[:, 1:]
    assert torch.equal(ours.sequences, theirs[:, : ours.sequences.shape[1]])


def test_peft_wrapped_generator_decodes_like_the_base_model():
    peft = pytest.importorskip("peft")
    model = tiny_bart(vocab=12, seed=11)
    ids, mask, ds = contexts(2, 2, 8, 12, seed=11)
    cfg = DecodeConfig(max_new_tokens=5, num_beams=2)
    base = generate(model, ids, mask, ds, 2, "rag_sequence_thorough", cfg)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped.train()
    out = generate(wrapped, ids, mask, ds, 2, "rag_sequence_thorough", cfg)  # LoRA starts as the identity
    assert wrapped.training, "decoding must hand the module back in training mode"
    assert torch.equal(out.sequences, base.sequences)
    torch.testing.assert_close(out.scores, base.scores)


def test_bad_inputs_are_clear_errors():
    model = tiny_bart(vocab=12)
    ids, mask, ds = contexts(2, 2, 8, 12)
    with pytest.raises(ValueError, match="mode"):
        generate(model, ids, mask, ds, 2, "beam")
    with pytest.raises(AssertionError, match="doc_scores"):
        generate(model, ids, mask, ds[:, :1], 2)
    with pytest.raises(ValueError, match="min_new_tokens"):
        DecodeConfig(max_new_tokens=2, min_new_tokens=3)


def test_t5_generator_cache_paths_agree():
    torch.manual_seed(12)
    cfg = T5Config(vocab_size=14, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1, dropout_rate=0.0, initializer_factor=4.0)
    model = T5ForConditionalGeneration(cfg).eval()
    assert special_tokens(model).bos is None
    g = torch.Generator().manual_seed(12)
    ids, mask, ds = torch.randint(2, 14, (6, 7), generator=g), torch.ones(6, 7, dtype=torch.long), torch.randn(3, 2)
    dc = DecodeConfig(max_new_tokens=5, num_beams=3)
    a = rag_token_decode(model, ids, mask, ds, 2, dc)
    b = rag_token_decode(model, ids, mask, ds, 2, dc, use_cache=False)
    assert torch.equal(a.sequences, b.sequences)
    a = rag_sequence_decode(model, ids, mask, ds, 2, dc, return_candidates=True)
    b = rag_sequence_decode(model, ids, mask, ds, 2, dc, return_candidates=True, use_cache=False)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.candidates, b.candidates):
        torch.testing.assert_close(x.doc_logliks, y.doc_logliks, atol=1e-4, rtol=1e-4)


def test_decode_config_nests_in_run_configs():
    cfg = from_dict(DecodeConfig, {"mode": "rag_sequence_fast", "num_beams": 2, "length_penalty": 0})
    assert cfg == DecodeConfig(mode="rag_sequence_fast", num_beams=2, length_penalty=0.0)
    with pytest.raises(ConfigError, match="mode"):
        from_dict(DecodeConfig, {"mode": "beam"})
    with pytest.raises(ConfigError, match="num_beam"):
        from_dict(DecodeConfig, {"num_beam": 2})
