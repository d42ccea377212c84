"""InfoNCE against a brute-force reference, across processes, and with gradient caching."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from rag_e2e.losses import (LearnedTemperature, average_gradients, contrastive_backward, gather_nograd,
                            gather_with_grad, info_nce, similarity)


def brute_force_info_nce(q, c, positive, exclude, temperature, score):
    """Explicit loops in float64: -log exp(s_ip/t) / sum_{j not excluded} exp(s_ij/t)."""
    out = []
    for i in range(q.shape[0]):
        qi = q[i].double()
        def s(j):
            cj = c[j].double()
            if score == "cosine":
                return float(qi @ cj) / (float(qi.norm()) * float(cj.norm()))
            return float(qi @ cj)
        denom = sum(math.exp(s(j) / temperature) for j in range(c.shape[0])
                    if exclude is None or not exclude[i, j] or j == positive[i])
        out.append(-(s(int(positive[i])) / temperature - math.log(denom)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("score", ["dot", "cosine"])
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_info_nce_equals_brute_force_with_masks(score, temperature):
    g = torch.Generator().manual_seed(0)
    b, n, d = 5, 13, 7
    q, c = torch.randn(b, d, generator=g), torch.randn(n, d, generator=g)
    positive = torch.tensor([0, 3, 3, 7, 12])  # two questions share a positive
    exclude = torch.rand(b, n, generator=g) < 0.3
    exclude[torch.arange(b), positive] = False
    got = info_nce(q.double(), c.double(), positive, exclude, temperature, score)
    want = brute_force_info_nce(q, c, positive, exclude, temperature, score)
    assert got.shape == (b,)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    unmasked = info_nce(q.double(), c.double(), positive, None, temperature, score)
    torch.testing.assert_close(unmasked, brute_force_info_nce(q, c, positive, None, temperature, score))
    assert (unmasked >= got - 1e-12).all() and (unmasked > got).any()  # masking removes denominator terms


def test_excluded_candidates_get_no_gradient_and_do_not_change_the_loss():
    g = torch.Generator().manual_seed(1)
    q, c = torch.randn(3, 4, generator=g), torch.randn(6, 4, generator=g, requires_grad=True)
    positive = torch.tensor([0, 1, 2])
    exclude = torch.zeros(3, 6, dtype=torch.bool)
    exclude[:, 5] = True  # candidate 5 contains every question's answer
    loss = info_nce(q, c, positive, exclude).sum()
    loss.backward()
    assert c.grad[5].abs().max() == 0
    c2 = c.detach().clone()
    c2[5] = 100.0  # would dominate every denominator if it counted
    torch.testing.assert_close(info_nce(q, c2, positive, exclude).sum(), loss.detach())


def test_excluding_a_positive_or_bad_shapes_is_an_error():
    q, c = torch.randn(2, 3), torch.randn(4, 3)
    exclude = torch.zeros(2, 4, dtype=torch.bool)
    exclude[1, 2] = True
    with pytest.raises(AssertionError, match="positive is marked as excluded"):
        info_nce(q, c, torch.tensor([0, 2]), exclude)
    with pytest.raises(AssertionError, match="positive index"):
        info_nce(q, c, torch.tensor([0, 4]))
    with pytest.raises(AssertionError, match="positive must be"):
        info_nce(q, c, torch.tensor([0]))
    with pytest.raises(ValueError, match="score"):
        similarity(q, c, "l2")


def test_learned_temperature_trains_and_is_clamped():
    t = LearnedTemperature(init=0.5, max_scale=10.0)
    assert float(t().detach()) == pytest.approx(0.5)
    q, c = torch.randn(4, 3), torch.randn(4, 3)
    info_nce(q, c, torch.arange(4), temperature=t()).mean().backward()
    assert t.log_scale.grad is not None and t.log_scale.grad != 0
    with torch.no_grad():
        t.log_scale.fill_(50.0)
    assert float(t().detach()) == pytest.approx(0.1)  # 1 / max_scale


# --- two processes (gloo on CPU) vs one process on the concatenated batch -----------------

B, D_IN, D = 3, 6, 4
N_LOCAL = (5, 8)  # candidates per process differ: the gather pads and unpads


def _problem():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D_IN, D, generator=g)
    xq = [torch.randn(B, D_IN, generator=g) for _ in range(2)]
    xc = [torch.randn(n, D_IN, generator=g) for n in N_LOCAL]
    ids = [torch.randint(0, 6, (n,), generator=g) for n in N_LOCAL]  # passage ids: duplicates happen
    for r in range(2):
        ids[r][:B] = torch.tensor([10 * r, 10 * r + 1, 0])  # the positives; 0 also appears in rank 0's pool
    return w, xq, xc, ids


def _loss(w, xq, xc, ids_all, pos_ids, offset):
    """Mean InfoNCE of the local questions; exclude other copies of each positive."""
    q, c = xq @ w, xc @ w
    c_all, off = gather_with_grad(c)
    assert off == offset
    positive = torch.arange(B) + offset
    exclude = ids_all[None, :] == pos_ids[:, None]
    exclude[torch.arange(B), positive] = False
    return info_nce(q, c_all, positive, exclude, temperature=0.5).mean()


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        w, xq, xc, ids = _problem()
        w = w.clone().requires_grad_()
        xc_r = xc[rank].clone().requires_grad_()
        ids_all, offset = gather_nograd(ids[rank])
        assert torch.equal(ids_all, torch.cat(ids)) and offset == (0 if rank == 0 else N_LOCAL[0])
        loss = _loss(w, xq[rank], xc_r, ids_all, ids[rank][:B], offset)
        loss.backward()
        average_gradients([w])  # as DDP does
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        save_file({"loss": mean_loss / 2, "w_grad": w.grad, "xc_grad": xc_r.grad},
                  os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    w, xq, xc, ids = _problem()
    w = w.clone().requires_grad_()
    xc_all = torch.cat(xc).clone().requires_grad_()
    ids_all = torch.cat(ids)
    q, c = torch.cat(xq) @ w, xc_all @ w
    positive = torch.cat([torch.arange(B), torch.arange(B) + N_LOCAL[0]])
    pos_ids = ids_all[positive]
    exclude = ids_all[None, :] == pos_ids[:, None]
    exclude[torch.arange(2 * B), positive] = False
    loss = info_nce(q, c, positive, exclude, temperature=0.5).mean()
    loss.backward()
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for r in ranks:
        torch.testing.assert_close(r["loss"], loss.detach())
        torch.testing.assert_close(r["w_grad"], w.grad)
    # each process's own candidates get d(sum of both losses)/dx, i.e. world_size x d(mean)/dx
    got = torch.cat([ranks[0]["xc_grad"], ranks[1]["xc_grad"]]) / 2
    torch.testing.assert_close(got, xc_all.grad)


# --- gradient caching ----------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_thread():
    # tiny models gain nothing from threads; on a loaded machine OpenMP's spinning costs 10x
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_biencoder(dropout):
    from transformers import BertConfig, BertModel  # here, not at the top: spawned workers import this file

    from rag_e2e.encoders import BiEncoder

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    # float64: the comparison is of algorithms, not of float32 summation orders
    return BiEncoder(BertModel(cfg, add_pooling_layer=False), BertModel(cfg, add_pooling_layer=False),
                     pooling="mean").double()


def _batch(n, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=g)
    ids = torch.randint(1, 50, (n, 12), generator=g)
    mask = (torch.arange(12)[None] < lengths[:, None]).long()
    return ids * mask, mask


def _grads(enc):
    return {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


def _run(enc, chunk, seed=123):
    enc.zero_grad()
    torch.manual_seed(seed)
    q, d = _batch(6, 1), _batch(12, 2)
    loss_of = lambda qe, ce: info_nce(qe, ce, torch.arange(6) * 2, temperature=0.3).mean()
    loss = contrastive_backward(enc.encode_queries, enc.encode_docs, q, d, loss_of, chunk)
    return loss, _grads(enc)


def test_gradient_caching_equals_plain_backward():
    enc = _tiny_biencoder(dropout=0.0)
    enc.train()
    loss, ref = _run(enc, None)
    for chunk in (1, 4, 100):
        loss_c, got = _run(enc, chunk)
        torch.testing.assert_close(loss_c, loss, rtol=1e-10, atol=1e-12)
        assert got.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-7, atol=1e-10, msg=name)


def test_gradient_caching_replays_dropout():
    """With dropout, the cached gradients are exact for the masks the first pass drew: equal
    to a plain backward through the same chunked forward from the same seed."""
    enc = _tiny_biencoder(dropout=0.3)
    enc.train()
    loss_c, got = _run(enc, 4)
    enc.zero_grad()
    torch.manual_seed(123)
    q, d = _batch(6, 1), _batch(12, 2)

    def chunked(encode, batch):
        ids, mask = batch
        return torch.cat([encode(ids[i:i + 4, :int(mask[i:i + 4].sum(1).max())],
                                 mask[i:i + 4, :int(mask[i:i + 4].sum(1).max())]) for i in range(0, len(ids), 4)])

    loss = info_nce(chunked(enc.encode_queries, q), chunked(enc.encode_docs, d), torch.arange(6) * 2,
                    temperature=0.3).mean()
    loss.backward()
    torch.testing.assert_close(loss_c, loss.detach(), rtol=1e-10, atol=1e-12)
    for name, g in _grads(enc).items():
        torch.testing.assert_close(got[name], g, rtol=1e-7, atol=1e-10, msg=name)
    _, other_seed = _run(enc, 4, seed=7)  # and the dropout masks did matter
    assert any(not torch.allclose(other_seed[n], got[n]) for n in got)
