"""Our RAG decoders against transformers' RagSequenceForGeneration / RagTokenForGeneration.

Both get the same random BART generator (identical weights), the same assembled contexts
(`context_input_ids`, `context_attention_mask`, `doc_scores`: no retriever) and the same beam
settings. Prints whether they agree (best hypotheses, scores) and median wall times, with
repetitions interleaved so that a busy machine slows both alike. No assertions on time.

    python benchmarks/bench_decoding.py                       # b=8, k=5, 2-layer d=128 BART, CPU
    python benchmarks/bench_decoding.py --layers 4 --d-model 256 --vocab 50265 --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tqdm import tqdm
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from rag_e2e.decoding import DecodeConfig, generate

BOS, PAD, EOS = 0, 1, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--b", type=int, default=8, help="questions")
    p.add_argument("--k", type=int, default=5, help="passages per question")
    p.add_argument("--src-len", type=int, default=128, help="longest (question, passage) input; others 64..this")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder layers")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--init-std", type=float, default=0.1, help="larger = peakier next-token distributions")
    p.add_argument("--eos-bias", type=float, default=3.0, help="logit bias on eos so answers vary in length")
    p.add_argument("--ragged", action="store_true",
                   help="pad inputs to random lengths; transformers' RagSequence beams then read the padding "
                        "(v5 generate() infers no encoder mask and RagSequence passes attention_mask=None)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_models(args):
    """A random BART (BART-large's special tokens and forced BOS/EOS), and both RAG wrappers holding copies."""
    torch.manual_seed(args.seed)
    heads = max(1, args.d_model // 64)
    gen_cfg = BartConfig(
        vocab_size=args.vocab, d_model=args.d_model, encoder_layers=args.layers, decoder_layers=args.layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * args.d_model,
        decoder_ffn_dim=4 * args.d_model, max_position_embeddings=args.src_len + 64, init_std=args.init_std,
    )
    bart = BartForConditionalGeneration(gen_cfg)
    with torch.no_grad():
        bart.final_logits_bias[0, EOS] = args.eos_bias
    q_cfg = DPRConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=128)
    rag_cfg = RagConfig.from_question_encoder_generator_configs(q_cfg, gen_cfg, n_docs=args.k)
    models = {"ours": bart}
    for name, cls in (("seq", RagSequenceForGeneration), ("tok", RagTokenForGeneration)):
        rag = cls(config=rag_cfg, question_encoder=DPRQuestionEncoder(q_cfg))
        rag.generator.load_state_dict(bart.state_dict())
        models[name] = rag
    for m in models.values():
        m.to(args.device).eval()
    for gc in (bart.generation_config, models["seq"].generator.generation_config, models["tok"].generation_config):
        gc.forced_bos_token_id, gc.forced_eos_token_id = BOS, EOS  # as facebook/bart-large
    return models


def contexts(args):
    """Assembled (question, passage) inputs of src_len tokens (--ragged: right-padded to 64..src_len)
    and retrieval scores."""
    g = torch.Generator().manual_seed(args.seed + 1)
    n = args.b * args.k
    ids = torch.randint(3, args.vocab, (n, args.src_len), generator=g)
    lens = torch.randint(min(64, args.src_len), args.src_len + 1, (n,), generator=g)
    lens = lens if args.ragged else torch.full_like(lens, args.src_len)
    mask = (torch.arange(args.src_len)[None] < lens[:, None]).long()
    ids = ids.masked_fill(mask == 0, PAD)
    scores = torch.randn(args.b, args.k, generator=g) * 2
    return ids.to(args.device), mask.to(args.device), scores.to(args.device)


def runners(models, args, ids, mask, ds):
    """name -> zero-argument callable returning (sequences without decoder start (b, t), scores or None)."""
    cfg = DecodeConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens, min_new_tokens=0,
                       length_penalty=1.0, no_repeat_bos=False, early_stopping=True)
    common = dict(context_input_ids=ids, context_attention_mask=mask, doc_scores=ds, n_docs=args.k,
                  num_beams=args.beams, length_penalty=1.0, early_stopping=True)

    def hf_seq():
        out = models["seq"].generate(**common, max_new_tokens=args.max_new_tokens, do_deduplication=True)
        return out[:, 1:], None

    def hf_tok():  # RagTokenForGeneration.generate ignores max_new_tokens: max_length counts the start token
        out = models["tok"].generate(**common, max_length=args.max_new_tokens + 1, output_scores=True,
                                     return_dict_in_generate=True)
        return out.sequences[:, 1:], out.sequences_scores

    def ours(mode):
        def run():
            out = generate(models["ours"], ids, mask, ds, args.k, mode, cfg)
            return out.sequences, out.scores
        return run

    return {"rag_sequence_thorough": (hf_seq, ours("rag_sequence_thorough")),
            "rag_token_beam": (hf_tok, ours("rag_token")),
            "rag_sequence_fast": (None, ours("rag_sequence_fast"))}


def hf_sequence_scores(rag, ids, mask, ds, seqs, k) -> torch.Tensor:
    """transformers' own log p(y|x) (RagSequence loss, exclude_bos_score) of each question's hypothesis."""
    start = torch.full_like(seqs[:, :1], rag.config.generator.decoder_start_token_id)
    labels = torch.cat([start, seqs], 1)
    out = []
    for i in range(seqs.shape[0]):
        rows = slice(i * k, (i + 1) * k)
        loss = rag(context_input_ids=ids[rows], context_attention_mask=mask[rows], doc_scores=ds[i : i + 1],
                   labels=labels[i : i + 1], exclude_bos_score=True, n_docs=k).loss
        out.append(-loss[0])
    return torch.stack(out)


def same_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise equality of two padded id tensors (b, t1), (b, t2), padding ignored."""
    t = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(x, (0, t - x.shape[1]), value=PAD) for x in (a, b))
    return (a == b).all(1)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = build_models(args)
    ids, mask, ds = contexts(args)
    runs = runners(models, args, ids, mask, ds)
    print(f"b={args.b} k={args.k} src_len<={args.src_len} beams={args.beams} max_new_tokens={args.max_new_tokens} "
          f"BART layers={args.layers} d_model={args.d_model} vocab={args.vocab} device={args.device} "
          f"threads={torch.get_num_threads()} reps={args.reps}")
    times = {(name, who): [] for name in runs for who in ("transformers", "ours")}
    results = {}
    with torch.no_grad():
        for _ in tqdm(range(args.reps), desc="repetitions"):
            for name, pair in runs.items():
                for who, fn in zip(("transformers", "ours"), pair):
                    if fn is None:
                        continue
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    results[name, who] = fn()
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    times[name, who].append(time.perf_counter() - t0)
        report_agreement(models, args, ids, mask, ds, results)
    for name in runs:
        ours_t = statistics.median(times[name, "ours"])
        line = f"{name:24s} ours {ours_t:8.3f} s"
        if times[name, "transformers"]:
            hf_t = statistics.median(times[name, "transformers"])
            line += f"   transformers {hf_t:8.3f} s   ratio transformers/ours {hf_t / ours_t:6.2f}x"
        print(line)


def report_agreement(models, args, ids, mask, ds, results) -> None:
    seq_hf, _ = results["rag_sequence_thorough", "transformers"]
    seq_ours, seq_scores = results["rag_sequence_thorough", "ours"]
    same = same_rows(seq_hf, seq_ours)
    hf_scores = hf_sequence_scores(models["seq"], ids, mask, ds, seq_ours, args.k)
    print(f"rag_sequence_thorough: same best hypothesis for {int(same.sum())}/{args.b} questions; "
          f"our answers' log p(y|x), ours vs transformers' loss: max |diff| = "
          f"{(seq_scores - hf_scores).abs().max().item():.2e}")
    tok_hf, tok_hf_scores = results["rag_token_beam", "transformers"]
    tok_ours, tok_scores = results["rag_token_beam", "ours"]
    same = same_rows(tok_hf, tok_ours)
    print(f"rag_token_beam: same output for {int(same.sum())}/{args.b} questions; "
          f"sequences_scores max |diff| = {(tok_scores - tok_hf_scores).abs().max().item():.2e}")
    lens = (seq_ours != PAD).sum(1).tolist()
    print(f"answer lengths (thorough, ours): {lens}")
    fast, _ = results["rag_sequence_fast", "ours"]
    print(f"rag_sequence_fast picks the thorough answer for {int(same_rows(fast, seq_ours).sum())}/{args.b} questions")


if __name__ == "__main__":
    main()
