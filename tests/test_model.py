"""RagModel: gradients reach the right places, LoRA trains only adapters, bad input is named."""

import numpy as np
import pytest
import torch

from conftest import tiny_bart, tiny_bert
from rag_e2e.encoders import BiEncoder
from rag_e2e.generator import GeneratorConfig, merged_generator, trainable_parameters, wrap_peft
from rag_e2e.index import build_index
from rag_e2e.inputs import doc_encoder_inputs, pair_template, query_inputs, target_labels, tokenize_questions
from rag_e2e.model import RagBatch, RagConfig, RagModel, StaticRetrieval
from rag_e2e.passages import PassageStore, tokenize_passages


def build(tiny_world, mode="paper", marginalize="sequence", k=3, generator=None, shared=False):
    passages, questions, tok = tiny_world
    store = PassageStore.from_records(passages)
    gp = tokenize_passages(store, tok, "generator", 32)
    dp = tokenize_passages(store, tok, "retriever", 32)
    q, d = tiny_bert(len(tok), seed=1), None if shared else tiny_bert(len(tok), seed=2)
    ret = BiEncoder(q, d, pooling="mean")
    with torch.no_grad():
        ids, mask = doc_encoder_inputs(np.arange(len(store))[None], dp, tok.pad_token_id)
        emb = ret.encode_docs(ids, mask).numpy().astype(np.float16)
    retrieval = StaticRetrieval(build_index(emb.astype(np.float32), "flat"), emb)
    gen = generator or tiny_bart(len(tok))
    cfg = RagConfig(n_docs=k, mode=mode, marginalize=marginalize)
    model = RagModel(ret, gen, retrieval, cfg, gp, pair_template(tok), tok.pad_token_id, 48, dp, tok.pad_token_id)
    qs = [x["question"] for x in questions[:4]]
    qi, qm = query_inputs(tok, qs, 16)
    batch = RagBatch(qi, qm, tokenize_questions(tok, qs, 16), target_labels(tok, [x["answers"][0] for x in questions[:4]], 8))
    return model, batch, tok


@pytest.mark.parametrize("marginalize", ["sequence", "token"])
def test_paper_mode_gradients_reach_query_encoder_not_doc_encoder(tiny_world, marginalize):
    model, batch, _ = build(tiny_world, "paper", marginalize)
    out = model(batch)
    assert out.loss.ndim == 0 and out.doc_scores.shape == (4, 3) and out.doc_ids.shape == (4, 3)
    out.loss.backward()
    q_grad = sum(p.grad.abs().sum() for p in model.retriever.query_encoder.parameters() if p.grad is not None)
    assert q_grad > 0
    assert all(not p.requires_grad for p in model.retriever.doc_encoder.parameters())
    assert sum(p.grad.abs().sum() for p in model.generator.parameters() if p.grad is not None) > 0


def test_end2end_mode_gradients_reach_doc_encoder(tiny_world):
    model, batch, _ = build(tiny_world, "end2end")
    model(batch).loss.backward()
    d_grad = sum(p.grad.abs().sum() for p in model.retriever.doc_encoder.parameters() if p.grad is not None)
    assert d_grad > 0


def test_paper_mode_scores_are_stored_embeddings(tiny_world):
    model, batch, _ = build(tiny_world, "paper")
    out = model(batch)
    with torch.no_grad():
        q = model.retriever.encode_queries(batch.query_input_ids, batch.query_attention_mask)
    emb = torch.from_numpy(model.retrieval.embeddings[out.doc_ids].astype(np.float32))  # (b, k, d)
    torch.testing.assert_close(out.doc_scores.detach(), torch.einsum("bd,bkd->bk", q, emb))
    assert (np.diff(out.doc_scores.detach().numpy(), axis=1) <= 1e-5).all()  # best first


def test_loss_equals_marginalised_generator_outputs(tiny_world):
    """The model's loss is rag_sequence_nll of the per-passage generator logits it ran."""
    from rag_e2e.marginalize import rag_sequence_nll

    model, batch, _ = build(tiny_world, "paper")
    out = model(batch, return_logits=True)
    labels = batch.labels
    ref = []
    for i in range(4):
        per_doc = []
        for j in range(3):
            row = i * 3 + j
            dec = torch.cat([torch.tensor([model.gen_config.decoder_start_token_id]),
                             labels[i, :-1].clamp(min=0)]).masked_fill(torch.cat([torch.tensor([False]), labels[i, :-1] == -100]), 1)
            lg = model.generator(input_ids=out.context_input_ids[row:row + 1],
                                 attention_mask=out.context_attention_mask[row:row + 1],
                                 decoder_input_ids=dec[None]).logits
            per_doc.append(lg[0])
        ref.append(torch.stack(per_doc))
    ref_nll = rag_sequence_nll(torch.stack(ref), out.doc_scores, labels)
    torch.testing.assert_close(out.nll, ref_nll, rtol=1e-4, atol=1e-4)


def test_question_is_never_truncated_only_the_passage(tiny_world):
    model, batch, tok = build(tiny_world, "paper")
    model.max_source_length = 10
    ids, mask = model.contexts(batch, np.array([[0, 1, 2]] * 4), "cpu")
    for row in range(ids.shape[0]):
        q = batch.question_ids[row // 3]
        assert ids[row, 1: 1 + len(q)].tolist() == q
        assert mask[row].sum() <= 10
    model.max_source_length = 5
    with pytest.raises(ValueError, match="max_source_length"):
        model.contexts(batch, np.array([[0, 1, 2]] * 4), "cpu")


def test_lora_trains_only_adapters_and_merging_keeps_outputs(tiny_world):
    _, _, tok = tiny_world
    cfg = GeneratorConfig(model="x", peft="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                          lora_target_modules=["q_proj", "v_proj", "fc1"])
    gen = wrap_peft(tiny_bart(len(tok)), cfg)
    names = list(trainable_parameters(gen))
    assert names and all("lora_" in n for n in names)
    model, batch, _ = build(tiny_world, "paper", generator=gen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(batch).loss.backward()
    opt.step()  # move the adapters away from their zero init so merging is not trivially a no-op
    model.eval()
    with torch.no_grad():
        before = model(batch, return_logits=True).logits
        model.generator = merged_generator(model.generator)
        after = model(batch, return_logits=True).logits
    assert not any("lora_" in n for n, _ in model.generator.named_parameters())
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["ia3", "prefix", "adalora"])
def test_other_peft_methods_go_through_the_same_path(tiny_world, method):
    _, _, tok = tiny_world
    cfg = GeneratorConfig(model="x", peft=method, lora_target_modules=["q_proj", "v_proj", "fc1"], prefix_tokens=4)
    gen = wrap_peft(tiny_bart(len(tok)), cfg)
    model, batch, _ = build(tiny_world, "paper", generator=gen)
    model(batch).loss.backward()
    grads = [p.grad for p in trainable_parameters(model.generator).values()]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_k_larger_than_corpus_is_an_error(tiny_world):
    model, batch, _ = build(tiny_world, k=50)
    with pytest.raises(ValueError, match="k=50 is larger than the index"):
        model(batch)


def test_empty_question_is_an_error(tiny_world):
    _, _, tok = tiny_world
    with pytest.raises(ValueError, match="question 1 is empty"):
        tokenize_questions(tok, ["what is key1 ?", "  "], 16)
