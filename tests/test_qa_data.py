"""QA readers on fixture files in the real formats, and every error they raise."""

import ast
import json
import logging
from pathlib import Path

import datasets
import pytest

from rag_e2e import qa_data as Q
from rag_e2e.qa_data import DataError

FIX = Path(__file__).parent / "fixtures" / "qa"


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _records(**change):
    """The dev fixture's records with record 1 changed."""
    recs = json.loads((FIX / "biencoder-nq-dev.json").read_text(encoding="utf-8"))
    recs[1].update(change)
    return recs


# --- DPR *.qa.csv ------------------------------------------------------------------------


def test_read_qa_csv():
    exs = Q.read_qa_csv(FIX / "nq-test.qa.csv")
    assert len(exs) == 6
    assert exs[0] == Q.QAExample("0", "who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"])
    assert exs[1].answers == ["May 18, 2018"]  # comma inside the answer
    assert exs[3].answers == ["Bobby Russell", "Vicki Lawrence"]
    assert exs[4].answers == ["James Joyce", "Flann O'Brien"]  # apostrophe, double-quoted literal
    assert [e.qid for e in exs] == [str(i) for i in range(6)]


def test_read_qa_csv_malformed_row_names_file_and_line():
    with pytest.raises(DataError, match=r"bad\.qa\.csv line 3: answers are not a Python list literal"):
        Q.read_qa_csv(FIX / "bad.qa.csv")


@pytest.mark.parametrize(
    "row,message",
    [
        ("q\t'Paris'", "must be a list literal"),
        ("q\t['Paris', 3]", "list of strings"),
        ("q\t[]", "no gold answers"),
        ("q\t['']", "an answer is empty"),
        ("\t['Paris']", "empty question"),
        ("q\t['Paris']\textra", "expected 2 tab-separated columns, got 3"),
        ("q only", "expected 2 tab-separated columns, got 1"),
    ],
)
def test_read_qa_csv_errors(tmp_path, row, message):
    path = _write(tmp_path / "x.qa.csv", f"fine\t['ok']\n{row}\n")
    with pytest.raises(DataError, match=rf"x\.qa\.csv line 2: .*{message}"):
        Q.read_qa_csv(path)


def test_csv_answers_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    path = _write(tmp_path / "evil.qa.csv", f"q\t[{payload}]\n")
    with pytest.raises(DataError, match="evil.qa.csv line 1"):
        Q.read_qa_csv(path)
    assert not marker.exists()


def test_readers_do_not_call_eval_or_exec():
    for mod in ("qa_data", "metrics"):
        tree = ast.parse((Path(Q.__file__).parent / f"{mod}.py").read_text())
        names = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert not names & {"eval", "exec", "compile", "__import__"}, mod


# --- JSON lines --------------------------------------------------------------------------


def test_read_jsonl_nq_open_and_trivia_layouts():
    nq = Q.read_jsonl_qa(FIX / "nq_open-validation.jsonl")
    assert [e.question for e in nq][:2] == [
        "where did they film hot tub time machine",
        "who has the right of way in international waters",
    ]
    assert nq[0].answers == ["Fernie Alpine Resort"] and nq[3].qid == "3"
    tqa = Q.read_jsonl_qa(FIX / "trivia_qa-unfiltered-validation.jsonl")
    assert tqa[0].qid == "tc_33"
    # value, then aliases, then normalized aliases, without duplicates
    assert tqa[0].answers == ["Sunset Boulevard", "Sunset Blvd", "West Sunset Boulevard", "sunset boulevard",
                              "sunset blvd", "west sunset boulevard"]


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"question": "q", "answer": ["a"]', "invalid JSON"),
        ('["q", ["a"]]', "expected an object"),
        ('{"question": "  ", "answer": ["a"]}', "empty question"),
        ('{"question": 7, "answer": ["a"]}', "'question' must be a string"),
        ('{"question": "q"}', "no 'answer' or 'answers' key"),
        ('{"question": "q", "answer": ["a"], "answers": ["b"]}', "both 'answer' and 'answers'"),
        ('{"question": "q", "answers": [["a"]]}', "list of strings"),
        ('{"question": "q", "answers": []}', "no gold answers"),
        ('{"question": "q", "answer": {"value": "a"}}', "TriviaQA-style answer dict lacks"),
        ('{"question": "q", "answers": ["a"], "gold_passage_id": {"id": 3}}', "gold_passage_id must be"),
    ],
)
def test_read_jsonl_errors(tmp_path, line, message):
    path = _write(tmp_path / "x.jsonl", '{"question": "fine", "answers": "ok"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=rf"x\.jsonl line 3: .*{message}"):
        Q.read_jsonl_qa(path)


def test_gold_passage_ids_from_jsonl_and_biencoder(tmp_path):
    path = _write(tmp_path / "g.jsonl", '{"question": "q", "answers": ["a"], "gold_passage_id": "7"}\n'
                                         '{"question": "r", "answers": ["b"], "gold_passage_id": [3, "9"]}\n'
                                         '{"question": "s", "answers": ["c"]}\n')
    assert [e.gold_ids() for e in Q.read_jsonl_qa(path)] == [["7"], ["3", "9"], []]
    exs, _ = Q.read_biencoder_json(FIX / "biencoder-nq-dev.json")
    assert exs[0].gold_ids() == ["11828866"]
    from rag_e2e.passages import PassageStore

    store = PassageStore.from_records([{"id": i, "title": "", "text": f"t{i}"} for i in ("3", "7", "8")])
    assert store.rows_of(["7", "404", "3"]) == {1, 0}


# --- DPR biencoder -----------------------------------------------------------------------


def test_read_biencoder_json():
    exs, counts = Q.read_biencoder_json(FIX / "biencoder-nq-dev.json")
    assert counts == {"no_positive": 0, "no_answers": 0, "ctx_without_text": 0}
    assert [e.qid for e in exs] == ["0", "1", "2"]
    first = exs[0]
    assert first.question == "who sings does he love me with reba" and first.answers == ["Linda Davis"]
    assert first.positive_ctxs[0]["passage_id"] == "11828866"
    assert first.positive_ctxs[0]["title"] == "Does He Love You"
    assert set(first.positive_ctxs[0]) == {"title", "text", "passage_id"}
    assert first.hard_negative_ctxs[0]["passage_id"] == "14525568"
    assert len(first.negative_ctxs) == 1
    assert len(exs[1].positive_ctxs) == 2 and exs[1].negative_ctxs == []


def test_biencoder_missing_positive_error_and_skip(caplog):
    path = FIX / "biencoder-missing-positive.json"
    with pytest.raises(DataError, match=r"biencoder-missing-positive\.json record 1: no positive passage"):
        Q.read_biencoder_json(path)
    with caplog.at_level(logging.WARNING, logger="rag_e2e.qa_data"):
        exs, counts = Q.read_biencoder_json(path, on_missing_positive="skip")
    assert [e.qid for e in exs] == ["0", "2"]  # qids stay the record indices
    assert counts["no_positive"] == 1
    assert "kept 2 of 3 records" in caplog.text and "no_positive" in caplog.text


def test_biencoder_empty_answers_and_textless_passage(tmp_path):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(_records(answers=[])), encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.json record 1: no gold answers"):
        Q.read_biencoder_json(path)
    assert Q.read_biencoder_json(path, "skip")[1]["no_answers"] == 1

    recs = _records()
    recs[1]["hard_negative_ctxs"][0]["text"] = ""
    del recs[1]["positive_ctxs"][0]["passage_id"]  # some DPR files have none
    path.write_text(json.dumps(recs), encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.json record 1 hard_negative_ctxs\[0\]: passage has no text"):
        Q.read_biencoder_json(path)
    exs, counts = Q.read_biencoder_json(path, "skip")
    assert counts["ctx_without_text"] == 1 and len(exs) == 3  # the passage goes, the record stays
    assert exs[1].hard_negative_ctxs == [] and exs[1].positive_ctxs[0]["passage_id"] is None


@pytest.mark.parametrize(
    "change,message",
    [
        ({"positive_ctxs": {"title": "x"}}, "'positive_ctxs' must be a list"),
        ({"positive_ctxs": ["text"]}, r"positive_ctxs\[0\]: a passage must be an object"),
        ({"positive_ctxs": [{"title": "x", "text": 5}]}, "must be strings"),
        ({"positive_ctxs": [{"text": "t", "passage_id": [1]}]}, "passage_id must be"),
        ({"question": ""}, "empty question"),
    ],
)
def test_biencoder_malformed_records_always_raise(tmp_path, change, message):
    path = tmp_path / "b.json"
    path.write_text(json.dumps(_records(**change)), encoding="utf-8")
    with pytest.raises(DataError, match=rf"b\.json record 1.*{message}"):
        Q.read_biencoder_json(path, on_missing_positive="skip")


def test_biencoder_file_level_errors(tmp_path):
    with pytest.raises(DataError, match=r"d\.json: expected a JSON list"):
        Q.read_biencoder_json(_write(tmp_path / "d.json", '{"question": "q"}'))
    with pytest.raises(DataError, match=r"t\.json: invalid JSON"):
        Q.read_biencoder_json(_write(tmp_path / "t.json", "[{"))
    with pytest.raises(ValueError, match="on_missing_positive"):
        Q.read_biencoder_json(FIX / "biencoder-nq-dev.json", on_missing_positive="drop")


# --- Hugging Face datasets ---------------------------------------------------------------


def test_load_hf_qa_from_data_files(tmp_path):
    nq = Q.load_hf_qa(str(FIX / "nq_open-validation.jsonl"), "validation", cache_dir=str(tmp_path))
    assert nq == Q.read_jsonl_qa(FIX / "nq_open-validation.jsonl")
    tqa = Q.load_hf_qa(str(FIX / "trivia_qa-unfiltered-validation.jsonl"), "validation", cache_dir=str(tmp_path))
    assert [e.qid for e in tqa] == ["tc_33", "tc_40", "tc_49"]
    assert tqa[2].answers == ["Bogotá", "Bogota", "Santa Fe de Bogotá", "bogota", "santa fe de bogota"]


def test_load_hf_qa_parquet_and_saved_dataset(tmp_path):
    rows = [json.loads(line) for line in (FIX / "nq_open-validation.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "nq.parquet"))
    exs = Q.load_hf_qa(str(tmp_path / "nq.parquet"), "train", cache_dir=str(tmp_path / "c"))
    assert [e.answers for e in exs] == [r["answer"] for r in rows]
    datasets.DatasetDict({"train": ds.select([0]), "validation": ds}).save_to_disk(str(tmp_path / "saved"))
    assert len(Q.load_hf_qa(str(tmp_path / "saved"), "validation")) == 4
    assert len(Q.load_qa(f"{tmp_path / 'saved'}:train")) == 1
    with pytest.raises(DataError, match="no split 'test'"):
        Q.load_hf_qa(str(tmp_path / "saved"), "test")
    with pytest.raises(DataError, match="cannot load '.txt'"):
        Q.load_hf_qa(_write(tmp_path / "q.txt", "x"), "train")


def test_load_hf_qa_row_errors(tmp_path):
    rows = [{"question": "fine", "answer": ["a"]}, {"question": "", "answer": ["b"]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet split train row 1: empty question"):
        Q.load_hf_qa(str(tmp_path / "bad.parquet"), "train", cache_dir=str(tmp_path / "c"))


def test_hub_names_map_to_repositories(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, cache_dir=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"question": "q", "answer": ["a"]}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    Q.load_qa("nq_open")
    Q.load_qa("trivia_qa:train")
    Q.load_qa("trivia_qa:rc.nocontext:validation")
    assert calls == [
        ("google-research-datasets/nq_open", None, "validation"),
        ("mandarjoshi/trivia_qa", "unfiltered.nocontext", "train"),
        ("mandarjoshi/trivia_qa", "rc.nocontext", "validation"),
    ]


# --- load_qa dispatch --------------------------------------------------------------------


def test_load_qa_dispatches_on_form(tmp_path):
    assert Q.load_qa(FIX / "nq-test.qa.csv") == Q.read_qa_csv(FIX / "nq-test.qa.csv")
    assert Q.load_qa(str(FIX / "nq_open-validation.jsonl")) == Q.read_jsonl_qa(FIX / "nq_open-validation.jsonl")
    assert Q.load_qa(FIX / "biencoder-nq-dev.json") == Q.read_biencoder_json(FIX / "biencoder-nq-dev.json")[0]
    assert len(Q.load_qa(FIX / "biencoder-missing-positive.json", on_missing_positive="skip")) == 2
    with pytest.raises(DataError, match="has no splits"):
        Q.load_qa("missing.jsonl:train")
    with pytest.raises(DataError, match="expected a path, name"):
        Q.load_qa("a:b:c:d")
    with pytest.raises(FileNotFoundError, match="nowhere.qa.csv"):
        Q.load_qa(tmp_path / "nowhere.qa.csv")
    with pytest.raises(DataError, match=r"x\.qa\.csv line 1: empty question"):
        Q.load_qa(_write(tmp_path / "x.qa.csv", " \t['a']\n"))
