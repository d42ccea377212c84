"""Passage store: DPR tsv / JSONL reading, validation errors with file:line, one-time tokenization."""

import json

import numpy as np
import pytest

from conftest import word_tokenizer
from rag_e2e.inputs import doc_encoder_inputs, generator_inputs, pair_template
from rag_e2e.passages import DataError, PassageStore, TokenizedPassages, read_passages, tokenize_passages

TSV = "id\ttext\ttitle\n1\talpha beta gamma\tFirst\n2\t\"quoted \"\"text\"\" here\"\tSecond\n3\tdelta\t\n"


def test_reads_dpr_tsv(tmp_path):
    p = tmp_path / "psgs_w100.tsv"
    p.write_text(TSV)
    store = read_passages(p)
    assert len(store) == 3
    assert store[1] == {"id": "2", "title": "Second", "text": 'quoted "text" here'}
    assert store.row_of("3") == 2
    with pytest.raises(KeyError, match="'9'"):
        store.row_of("9")


def test_reads_jsonl_and_fingerprint_matches_tsv(tmp_path):
    rows = [{"id": "1", "title": "First", "text": "alpha beta gamma"},
            {"id": "2", "title": "Second", "text": 'quoted "text" here'}, {"id": "3", "title": "", "text": "delta"}]
    j = tmp_path / "p.jsonl"
    j.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t = tmp_path / "p.tsv"
    t.write_text(TSV)
    assert read_passages(j).fingerprint == read_passages(t).fingerprint == PassageStore.from_records(rows).fingerprint


@pytest.mark.parametrize("content, message", [
    ("id\ttext\ttitle\n1\ta\tA\n2\tb\n", r"p.tsv:3: expected 3 tab-separated fields, got 2"),
    ("id\ttext\ttitle\n1\ta\tA\n1\tb\tB\n", r"p.tsv:3: duplicate passage id '1' \(first at line 2\)"),
    ("id\ttext\ttitle\n1\t \tA\n", r"p.tsv:2: passage '1' has no text"),
    ("id\ttitle\n1\tA\n", r"p.tsv:1: header .* lacks column\(s\) \['text'\]"),
    ("", r"p.tsv: empty file"),
])
def test_malformed_tsv_names_file_and_line(tmp_path, content, message):
    p = tmp_path / "p.tsv"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        read_passages(p)


def test_malformed_jsonl_names_line(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"id": "1", "text": "a"}\n{"id": "2", "text": \n')
    with pytest.raises(DataError, match=r"p.jsonl:2: not valid JSON"):
        read_passages(p)


def test_tokenized_once_and_cached(tmp_path):
    p = tmp_path / "p.tsv"
    p.write_text(TSV)
    store = read_passages(p, cache_dir=tmp_path / "store")
    tok = word_tokenizer("alpha beta gamma quoted text here delta First Second / \"text\"".split())
    gp = tokenize_passages(store, tok, "generator", 4, cache_dir=tmp_path / "store")
    assert gp.get(0).tolist() == tok("First / alpha beta", add_special_tokens=False)["input_ids"]
    assert len(gp.get(2)) == 1  # empty title: text only
    again = tokenize_passages(store, tok, "generator", 4, cache_dir=tmp_path / "store")
    assert isinstance(again.tokens, np.memmap)  # reused from disk, not re-tokenized
    np.testing.assert_array_equal(again.tokens, gp.tokens)
    dp = tokenize_passages(store, tok, "retriever", 16)
    assert dp.get(0)[0] == tok.bos_token_id  # the tokenizer's own pair template
    ids, mask = doc_encoder_inputs(np.array([[0, 2]]), dp, tok.pad_token_id)
    assert ids.shape[0] == 2 and mask[1].sum() == len(dp.get(2))


def test_corrupt_token_cache_is_an_error(tmp_path):
    tp = TokenizedPassages(np.arange(10, dtype=np.int32), np.array([0, 4, 10]), {"k": 1})
    tp.save(tmp_path / "t")
    (tmp_path / "t" / "tokens.bin").write_bytes(b"\0" * 8)
    with pytest.raises(DataError, match="tokens.bin holds 2 ids"):
        TokenizedPassages.load(tmp_path / "t")


def test_generator_inputs_layout():
    tok = word_tokenizer("a b c d e f q".split())
    tmpl = pair_template(tok)
    passages = TokenizedPassages(np.array([5, 6, 7, 8, 9], dtype=np.int32), np.array([0, 3, 5]), {})
    ids, mask = generator_inputs([[10], [10, 10]], np.array([[0, 1], [1, 0]]), passages, tmpl, 6, tok.pad_token_id)
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    assert ids.tolist() == [[bos, 10, eos, 5, 6, eos], [bos, 10, eos, 8, 9, eos],
                            [bos, 10, 10, eos, 8, eos], [bos, 10, 10, eos, 5, eos]]
    ids, mask = generator_inputs([[10]], np.array([[1]]), passages, tmpl, 20, pad)
    assert ids.tolist() == [[bos, 10, eos, 8, 9, eos]] and mask.sum() == 6  # padded to the batch, not to 20
