"""One training step of RagModel against transformers' RagTokenForGeneration + RagRetriever.

Identical weights (a 4-layer BART and a 4-layer BERT/DPR query encoder, d=256), identical batch,
k and passages (10,000 passages of 100 words, exact inner-product index), forward + backward +
optimizer step, interleaved in one process on CPU. Also: RagModel's overhead over a bare
generator forward + backward + step on the same b*k inputs.

    python benchmarks/bench_train_step.py [--passages 10000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import numpy as np
import torch


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "[CLS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>")


def corpus(n, rng):
    words = [f"w{i}" for i in range(5000)]
    passages = [{"id": str(i), "title": f"t{i % 5000}", "text": " ".join(rng.choices(words, k=100))} for i in range(n)]
    questions = [" ".join(rng.choices(words, k=rng.randint(8, 14))) for _ in range(64)]
    answers = [" ".join(rng.choices(words, k=rng.randint(1, 4))) for _ in range(64)]
    return passages, questions, answers, words + [f"t{i}" for i in range(5000)] + ["/", "//"]


def build_models(v, d=256, layers=4):
    from transformers import BartConfig, BartForConditionalGeneration, DPRConfig, DPRQuestionEncoder

    torch.manual_seed(0)
    gen = BartForConditionalGeneration(BartConfig(
        vocab_size=v, d_model=d, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d, max_position_embeddings=512,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None))
    qenc = DPRQuestionEncoder(DPRConfig(vocab_size=v, hidden_size=d, num_hidden_layers=layers, num_attention_heads=4,
                                        intermediate_size=4 * d, max_position_embeddings=512, pad_token_id=1))
    return gen, qenc


def theirs(gen, qenc, tok, passages, emb, k):
    from datasets import Dataset
    from transformers import RagConfig, RagRetriever, RagTokenForGeneration
    from transformers.models.rag.retrieval_rag import CustomHFIndex

    ds = Dataset.from_dict({"title": [p["title"] for p in passages], "text": [p["text"] for p in passages],
                            "embeddings": list(emb.astype(np.float32))})
    ds.add_faiss_index("embeddings", metric_type=0)  # faiss.METRIC_INNER_PRODUCT, exact (IndexFlatIP)
    cfg = RagConfig.from_question_encoder_generator_configs(qenc.config, gen.config, n_docs=k, index_name="custom")
    cfg.max_combined_length = 300  # transformers' default: every context is padded to this
    retriever = RagRetriever(cfg, question_encoder_tokenizer=tok, generator_tokenizer=tok,
                             index=CustomHFIndex(cfg.retrieval_vector_size, ds))
    return RagTokenForGeneration(cfg, question_encoder=qenc, generator=gen, retriever=retriever)


def ours(gen, qenc, tok, passages, emb, k):
    from rag_e2e.encoders import BiEncoder
    from rag_e2e.index import build_index
    from rag_e2e.inputs import pair_template
    from rag_e2e.model import RagConfig, RagModel, StaticRetrieval
    from rag_e2e.passages import PassageStore, tokenize_passages

    store = PassageStore.from_records(passages)
    gp = tokenize_passages(store, tok, "generator", 256)
    enc = BiEncoder(qenc.question_encoder.bert_model, None, pooling="cls")
    retrieval = StaticRetrieval(build_index(emb.astype(np.float32), "flat"), emb)
    return RagModel(enc, gen, retrieval, RagConfig(n_docs=k, marginalize="token"), gp, pair_template(tok),
                    tok.pad_token_id, 300)


def timed(fn, opt):
    t = time.perf_counter()
    loss = fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passages", type=int, default=10000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--k", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rng = random.Random(0)
    passages, questions, answers, words = corpus(args.passages, rng)
    tok = word_tokenizer(words)
    gen, qenc = build_models(len(tok))
    emb = (np.random.default_rng(0).standard_normal((len(passages), 256)) * 0.1).astype(np.float16)

    from rag_e2e.inputs import query_inputs, target_labels, tokenize_questions
    from rag_e2e.model import RagBatch

    hf = theirs(copy.deepcopy(gen), copy.deepcopy(qenc), tok, passages, emb, args.k)
    me = ours(copy.deepcopy(gen), copy.deepcopy(qenc), tok, passages, emb, args.k)
    bare = copy.deepcopy(gen)
    for m in (hf, me, bare):
        m.train()
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5)
            for name, m in (("hf", hf), ("ours", me), ("bare", bare))}
    times = {"hf": [], "ours": [], "bare": []}
    for r in range(args.repeats + 1):
        sl = slice((r * args.batch) % 56, (r * args.batch) % 56 + args.batch)
        qs, ans = questions[sl], answers[sl]
        enc = tok(qs, padding=True, return_tensors="pt")
        hf_labels = tok(ans, padding=True, return_tensors="pt")["input_ids"]

        def hf_step():  # transformers: retrieval (search + strings + tokenization) inside forward
            return hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=hf_labels,
                      n_docs=args.k).loss.mean()

        qi, qm = query_inputs(tok, qs, 64)
        batch = RagBatch(qi, qm, tokenize_questions(tok, qs, 64), target_labels(tok, ans, 16))

        def our_step():  # everything from question strings already tokenized, as the training loop has them
            return me(batch).loss

        ctx = me(batch)
        ctx_ids, ctx_mask = ctx.context_input_ids, ctx.context_attention_mask
        rep = batch.labels.repeat_interleave(args.k, 0)

        def bare_step():  # the generator alone on the same b*k inputs
            return bare(input_ids=ctx_ids, attention_mask=ctx_mask, labels=rep).loss

        for name, fn in (("hf", hf_step), ("ours", our_step), ("bare", bare_step)):
            dt = timed(fn, opts[name])
            if r > 0:  # the first round warms up allocators and caches
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"passages={args.passages} b={args.batch} k={args.k} repeats={args.repeats} threads=2 (median seconds/step)")
    print(f"  transformers RagTokenForGeneration + RagRetriever: {med['hf']:.3f}s")
    print(f"  rag_e2e RagModel (marginalize=token):              {med['ours']:.3f}s")
    print(f"  bare generator on the same b*k inputs:             {med['bare']:.3f}s")
    print(f"  speed-up vs transformers: {med['hf'] / med['ours']:.2f}x")
    print(f"  overhead over the bare generator: {100 * (med['ours'] / med['bare'] - 1):.1f}%")
    print(f"  context length: ours {ctx_ids.shape[1]} tokens (dynamic), transformers 300 (max_combined_length)")


if __name__ == "__main__":
    main()
