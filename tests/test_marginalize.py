"""The two RAG objectives against brute-force enumeration and against transformers' get_nll."""

import math

import pytest
import torch
import torch.nn.functional as F

from rag_e2e.marginalize import (doc_posterior, doc_prior_entropy, rag_sequence_nll, rag_token_logprobs,
                                 rag_token_nll)


def random_case(b=3, k=4, t=5, v=7, seed=0, one_token=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, t, v, generator=g, dtype=torch.float64) * 2
    scores = torch.randn(b, k, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 3:] = -100  # padded
    if one_token and b > 1:
        labels[1, 1:] = -100  # a one-token answer
    return logits, scores, labels


def brute_sequence(logits, scores, labels, eps=0.0):
    b, k, t, v = logits.shape
    out = []
    for i in range(b):
        prior = [math.exp(scores[i, z]) for z in range(k)]
        prior = [p / sum(prior) for p in prior]
        total = 0.0
        for z in range(k):
            lp_seq = 0.0
            for j in range(t):
                if labels[i, j] == -100:
                    continue
                row = [math.exp(logits[i, z, j, w]) for w in range(v)]
                norm = sum(row)
                tok = math.log(row[labels[i, j]] / norm)
                smooth = sum(math.log(r / norm) for r in row) / v
                lp_seq += (1 - eps) * tok + eps * smooth
            total += prior[z] * math.exp(lp_seq)
        out.append(-math.log(total))
    return torch.tensor(out, dtype=torch.float64)


def brute_token(logits, scores, labels, eps=0.0):
    b, k, t, v = logits.shape
    out = []
    for i in range(b):
        prior = [math.exp(scores[i, z]) for z in range(k)]
        prior = [p / sum(prior) for p in prior]
        nll = 0.0
        for j in range(t):
            if labels[i, j] == -100:
                continue
            marg = [0.0] * v
            for z in range(k):
                row = [math.exp(logits[i, z, j, w]) for w in range(v)]
                for w in range(v):
                    marg[w] += prior[z] * row[w] / sum(row)
            tok = math.log(marg[labels[i, j]])
            smooth = sum(math.log(m) for m in marg) / v
            nll -= (1 - eps) * tok + eps * smooth
        out.append(nll)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("k", [1, 4])
def test_sequence_matches_brute_force(eps, k):
    logits, scores, labels = random_case(k=k)
    got = rag_sequence_nll(logits.double(), scores, labels, epsilon=eps).double()
    torch.testing.assert_close(got, brute_sequence(logits, scores, labels, eps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("k", [1, 4])
def test_token_matches_brute_force(eps, k):
    logits, scores, labels = random_case(k=k)
    got = rag_token_nll(logits, scores, labels, epsilon=eps).double()
    torch.testing.assert_close(got, brute_token(logits, scores, labels, eps), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_k1_is_plain_seq2seq_nll(eps):
    logits, scores, labels = random_case(k=1)
    ref = F.cross_entropy(logits[:, 0].permute(0, 2, 1).float(), labels, ignore_index=-100,
                          label_smoothing=eps, reduction="none").sum(-1)
    for fn in (rag_sequence_nll, rag_token_nll):
        torch.testing.assert_close(fn(logits.float(), scores.float(), labels, epsilon=eps), ref, rtol=1e-5, atol=1e-5)


def test_one_token_answer_keeps_the_prior():
    # With identical generator outputs under every doc, the sequence NLL must not depend on the prior
    # (the prior sums to one); with different outputs it must, also for one-token answers.
    logits, scores, labels = random_case(b=2, t=3)
    labels[:, 1:] = -100
    a = rag_sequence_nll(logits, scores, labels)
    b = rag_sequence_nll(logits, scores + torch.tensor([[5.0, 0, 0, 0], [0, 0, 0, 5.0]], dtype=scores.dtype), labels)
    assert (a - b).abs().min() > 1e-3


def test_posterior_is_bayes_rule():
    logits, scores, labels = random_case()
    post = doc_posterior(logits, scores, labels).double()
    lp = F.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None, :, None].expand(-1, 4, -1, 1)).squeeze(-1)
    seq = (lp * (labels != -100)[:, None]).sum(-1)
    joint = torch.softmax(scores, -1) * seq.exp()
    torch.testing.assert_close(post, joint / joint.sum(-1, keepdim=True))
    ent = doc_prior_entropy(torch.zeros(2, 4))
    torch.testing.assert_close(ent, torch.full((2,), math.log(4)))


def test_token_marginal_is_a_distribution():
    logits, scores, _ = random_case()
    m = rag_token_logprobs(logits, scores).exp().sum(-1)
    torch.testing.assert_close(m, torch.ones_like(m, dtype=torch.float32))


def test_gradients_flow_to_scores_and_logits():
    logits, scores, labels = random_case()
    logits.requires_grad_(True)
    scores.requires_grad_(True)
    (rag_sequence_nll(logits, scores, labels).sum() + rag_token_nll(logits, scores, labels).sum()).backward()
    assert scores.grad.abs().sum() > 0 and logits.grad.abs().sum() > 0


def test_shape_errors_are_caught():
    logits, scores, labels = random_case()
    with pytest.raises(AssertionError, match="doc_scores"):
        rag_sequence_nll(logits, scores[:, :2], labels)
    with pytest.raises(AssertionError, match="labels"):
        rag_token_nll(logits, scores, labels[:, :2])


# --- parity with transformers' RagSequenceForGeneration.get_nll / RagTokenForGeneration.get_nll ---

def _hf_rag(cls, v, pad_id):
    from transformers import BartConfig, BertConfig, RagConfig
    from transformers import DPRConfig

    gen = BartConfig(vocab_size=v, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=1,
                     decoder_attention_heads=1, encoder_ffn_dim=8, decoder_ffn_dim=8, pad_token_id=pad_id,
                     bos_token_id=None, eos_token_id=v - 1)
    q = DPRConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8)
    cfg = RagConfig.from_question_encoder_generator_configs(q, gen, n_docs=4)
    cfg.bos_token_id = None
    model = cls.__new__(cls)  # get_nll only reads .config: skip building the weights
    torch.nn.Module.__init__(model)
    model.config = cfg
    return model


def _to_hf(logits, labels, pad_id, start_id):
    """Ours: logits[t] predicts labels[t]. Theirs: target includes the start token and is shifted left inside."""
    b, k, t, v = logits.shape
    target = torch.cat([torch.full((b, 1), start_id), labels.masked_fill(labels == -100, pad_id)], 1)  # (b, t+1)
    seq_logits = torch.cat([logits, torch.zeros(b, k, 1, v, dtype=logits.dtype)], 2).reshape(b * k, t + 1, v)
    return seq_logits, target


def test_parity_with_transformers_rag_token():
    from transformers import RagTokenForGeneration

    v, pad = 9, 0
    logits, scores, labels = random_case(v=v, one_token=True)
    labels = labels.masked_fill(labels == pad, 3)
    hf = _hf_rag(RagTokenForGeneration, v, pad)
    seq_logits, target = _to_hf(logits, labels, pad, start_id=v - 1)
    theirs = hf.get_nll(seq_logits, scores, target, reduce_loss=False, epsilon=0.0, n_docs=4)
    torch.testing.assert_close(rag_token_nll(logits, scores, labels).double(), theirs.double(), rtol=1e-6, atol=1e-6)
    theirs_eps = hf.get_nll(seq_logits, scores, target, reduce_loss=False, epsilon=0.1, n_docs=4)
    torch.testing.assert_close(rag_token_nll(logits, scores, labels, 0.1).double(), theirs_eps.double(), rtol=1e-6, atol=1e-6)


def test_parity_with_transformers_rag_sequence():
    from transformers import RagSequenceForGeneration

    v, pad = 9, 0
    logits, scores, labels = random_case(v=v, one_token=False)
    labels = labels.masked_fill(labels == pad, 3)
    hf = _hf_rag(RagSequenceForGeneration, v, pad)
    seq_logits, target = _to_hf(logits, labels, pad, start_id=v - 1)
    theirs = hf.get_nll(seq_logits, scores, target, reduce_loss=False, epsilon=0.0, n_docs=4)
    torch.testing.assert_close(rag_sequence_nll(logits, scores, labels).double(), theirs.double(), rtol=1e-6, atol=1e-6)

    # transformers adds the prior at the second target position, so a one-token answer loses it;
    # ours counts it once per sequence (the formula). The two differ exactly there.
    labels[1, 1:] = -100
    seq_logits, target = _to_hf(logits, labels, pad, start_id=v - 1)
    theirs = hf.get_nll(seq_logits, scores, target, reduce_loss=False, epsilon=0.0, n_docs=4)
    ours = rag_sequence_nll(logits, scores, labels)
    torch.testing.assert_close(ours[[0, 2]].double(), theirs[[0, 2]].double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.double(), brute_sequence(logits, scores, labels), rtol=1e-6, atol=1e-6)
    assert (ours[1] - theirs[1]).abs() > 1e-3
