"""Question/answer data for open-domain QA: DPR's files and the Hugging Face datasets.

Every reader returns `QAExample`s and checks each record as it goes: a malformed one raises
`DataError` naming the file and the line (text formats) or record index (JSON lists, datasets).

Formats:
- DPR `*.qa.csv` (`nq-test.qa.csv`, `trivia-test.qa.csv`): tab-separated, question then a
  Python list literal of answers, `['Paris', "O'Brien"]`, parsed with `ast.literal_eval`.
- JSON lines with `question` and `answer` or `answers` (nq_open's export uses `answer`).
- DPR biencoder files (`biencoder-nq-train.json`, `-dev.json`): a JSON list of records with
  question, answers, positive_ctxs, negative_ctxs, hard_negative_ctxs.
- Hugging Face datasets by name (`nq_open`, `trivia_qa`), saved to disk, or as data files.

Split sizes in the RAG paper (Lewis et al., 2020), which follows DPR's open-domain splits:
- NQ-open: test 3,610 questions, the `validation` split of `nq_open` (NQ's own test is hidden).
- TriviaQA open: test 11,313 questions, the *unfiltered* dev set (`trivia_qa`, config
  `unfiltered.nocontext`, split `validation`) used as test; the `rc.nocontext` validation split
  is a different, larger set.
This is why `load_qa("nq_open")` and `load_qa("trivia_qa")` default to split `validation`.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

NQ_OPEN_TEST_SIZE = 3610
TRIVIAQA_OPEN_TEST_SIZE = 11313

# short name -> (hub repository, default config)
HF_DATASETS = {
    "nq_open": ("google-research-datasets/nq_open", None),
    "trivia_qa": ("mandarjoshi/trivia_qa", "unfiltered.nocontext"),
}
DEFAULT_SPLIT = "validation"  # the open-domain test set of both NQ-open and TriviaQA
_QID_KEYS = ("qid", "id", "question_id", "example_id")
_HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".arrow": "arrow"}


class DataError(ValueError):
    """A data file or dataset record that cannot be read; the message says where."""


@dataclass
class QAExample:
    """One question with its gold answers; biencoder files add passages.

    Each passage is a dict {"title": str, "text": str, "passage_id": str | None}.
    """

    qid: str
    question: str
    answers: list[str]
    positive_ctxs: list[dict] = field(default_factory=list)
    negative_ctxs: list[dict] = field(default_factory=list)
    hard_negative_ctxs: list[dict] = field(default_factory=list)
    gold_passage_ids: list[str] = field(default_factory=list)  # a QA record's `gold_passage_id`(s)

    def gold_ids(self) -> list[str]:
        """Ids of the passages known to answer it: positive_ctxs' passage_id, then gold_passage_ids."""
        ids = [str(c["passage_id"]) for c in self.positive_ctxs if c.get("passage_id") is not None]
        return ids + [i for i in self.gold_passage_ids if i not in ids]


# --- one record -> QAExample -------------------------------------------------------------


def _answers_from(value, where: str) -> list[str]:
    """Gold answers from a list of strings, one string, or TriviaQA's answer dict.

    TriviaQA's dict gives `value` + `aliases` + `normalized_aliases`, deduplicated in order.
    An empty result is returned as [] for the caller's policy; wrong types always raise.
    """
    if isinstance(value, str):
        value = [value]
    elif isinstance(value, Mapping):
        missing = {"value", "aliases", "normalized_aliases"} - value.keys()
        if missing:
            raise DataError(f"{where}: TriviaQA-style answer dict lacks {sorted(missing)}")
        value = [value["value"], *value["aliases"], *value["normalized_aliases"]]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise DataError(f"{where}: answers must be a list of strings, got {value!r}")
    if any(not a.strip() for a in value):
        raise DataError(f"{where}: an answer is empty: {value!r}")
    return list(dict.fromkeys(value))


def _question_from(rec: Mapping, where: str) -> str:
    q = rec.get("question")
    if not isinstance(q, str):
        raise DataError(f"{where}: 'question' must be a string, got {q!r}")
    if not q.strip():
        raise DataError(f"{where}: empty question")
    return q.strip()


def _answer_field(rec: Mapping, where: str):
    if "answer" in rec and "answers" in rec:
        raise DataError(f"{where}: both 'answer' and 'answers' given; keep one")
    if "answer" not in rec and "answers" not in rec:
        raise DataError(f"{where}: no 'answer' or 'answers' key (keys: {sorted(rec)})")
    return rec["answers"] if "answers" in rec else rec["answer"]


def _qid_from(rec: Mapping, index: int) -> str:
    for key in _QID_KEYS:
        if rec.get(key) not in (None, ""):
            return str(rec[key])
    return str(index)


def example_from_record(rec, where: str, index: int) -> QAExample:
    """A QAExample from a mapping with `question` and `answer`/`answers` (+ optional id)."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    question = _question_from(rec, where)
    answers = _answers_from(_answer_field(rec, where), where)
    if not answers:
        raise DataError(f"{where}: no gold answers")
    gold = rec.get("gold_passage_id", rec.get("gold_passage_ids", []))
    gold = [gold] if isinstance(gold, (str, int)) else gold
    if not isinstance(gold, list) or not all(isinstance(g, (str, int)) and str(g) for g in gold):
        raise DataError(f"{where}: gold_passage_id must be a passage id or a list of them, got {gold!r}")
    return QAExample(qid=_qid_from(rec, index), question=question, answers=answers,
                     gold_passage_ids=[str(g) for g in gold])


# --- DPR csv and JSON lines --------------------------------------------------------------


def _literal_answers(cell: str, where: str) -> list[str]:
    """Parse a Python list literal of strings; `ast.literal_eval` evaluates no code."""
    try:
        value = ast.literal_eval(cell.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise DataError(f"{where}: answers are not a Python list literal ({e}): {cell[:200]!r}") from e
    if not isinstance(value, list):
        raise DataError(f"{where}: answers must be a list literal, got {type(value).__name__}")
    return value


def read_qa_csv(path: str | os.PathLike) -> list[QAExample]:
    """DPR's `*.qa.csv`: `question<TAB>['answer', ...]` per line; qid is the 0-based row index.

    Read with `csv.reader(delimiter="\\t")` as DPR does, so quoting rules match its loader.
    """
    path = str(path)
    examples = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            for row in reader:
                where = f"{path} line {reader.line_num}"
                if not row:  # blank line
                    continue
                if len(row) != 2:
                    raise DataError(f"{where}: expected 2 tab-separated columns, got {len(row)}")
                rec = {"question": row[0], "answers": _literal_answers(row[1], where)}
                examples.append(example_from_record(rec, where, len(examples)))
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{path} line {reader.line_num}: {e}") from e
    return examples


def read_jsonl_qa(path: str | os.PathLike) -> list[QAExample]:
    """JSON lines, one object per line with `question` and `answer` or `answers`.

    Answers may be a list of strings, a string, or TriviaQA's answer dict; an `id`, `qid`,
    `question_id` or `example_id` key becomes the qid, else the 0-based record index.
    """
    path = str(path)
    examples = []
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path} line {lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON: {e}") from e
                examples.append(example_from_record(rec, where, len(examples)))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text: {e}") from e
    return examples


# --- DPR biencoder JSON ------------------------------------------------------------------


def _passage(raw, where: str) -> dict | None:
    """{"title", "text", "passage_id"} from a DPR ctx; None when it has no text."""
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: a passage must be an object, got {type(raw).__name__}")
    text, title, pid = raw.get("text"), raw.get("title", ""), raw.get("passage_id")
    if (text is not None and not isinstance(text, str)) or not isinstance(title, str):
        raise DataError(f"{where}: passage title and text must be strings, got {title!r}, {text!r}")
    if pid is not None and not isinstance(pid, (str, int)):
        raise DataError(f"{where}: passage_id must be a string or integer, got {pid!r}")
    if text is None or not text.strip():
        return None
    return {"title": title, "text": text, "passage_id": None if pid is None else str(pid)}


def _passages(rec: Mapping, key: str, where: str, skip: bool, counts: dict) -> list[dict]:
    raw = rec.get(key, [])
    if not isinstance(raw, list):
        raise DataError(f"{where}: '{key}' must be a list, got {type(raw).__name__}")
    out = []
    for j, ctx in enumerate(raw):
        p = _passage(ctx, f"{where} {key}[{j}]")
        if p is None:
            if not skip:
                raise DataError(f"{where} {key}[{j}]: passage has no text")
            counts["ctx_without_text"] += 1
        else:
            out.append(p)
    return out


def _biencoder_example(rec, where: str, index: int, skip: bool, counts: dict) -> QAExample | None:
    """One biencoder record; None (counted) when skipping a record without answers or positive."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    question = _question_from(rec, where)
    answers = _answers_from(_answer_field(rec, where), where)
    ctxs = {k: _passages(rec, k, where, skip, counts) for k in ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs")}
    problem = "no_answers" if not answers else "no_positive" if not ctxs["positive_ctxs"] else None
    if problem is None:
        return QAExample(_qid_from(rec, index), question, answers, **ctxs)
    if not skip:
        what = "no gold answers" if problem == "no_answers" else "no positive passage with text"
        raise DataError(f"{where}: {what} (use on_missing_positive='skip' to skip such records)")
    counts[problem] += 1
    return None


def read_biencoder_json(
    path: str | os.PathLike, on_missing_positive: str = "error"
) -> tuple[list[QAExample], dict[str, int]]:
    """DPR biencoder training/dev file -> (examples, skip counts).

    A record with no positive passage, an empty answers list, or a passage without text is an
    error naming the record, or with on_missing_positive="skip" is counted and logged: the
    record is dropped (counts "no_positive", "no_answers") or the passage is ("ctx_without_text").
    """
    if on_missing_positive not in ("error", "skip"):
        raise ValueError(f"on_missing_positive must be 'error' or 'skip', got {on_missing_positive!r}")
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of biencoder records, got {type(records).__name__}")
    skip = on_missing_positive == "skip"
    counts = {"no_positive": 0, "no_answers": 0, "ctx_without_text": 0}
    examples = []
    for i, rec in enumerate(tqdm(records, desc=f"reading {Path(path).name}", unit="q")):
        ex = _biencoder_example(rec, f"{path} record {i}", i, skip, counts)
        if ex is not None:
            examples.append(ex)
    if any(counts.values()):
        logger.warning("%s: kept %d of %d records; skipped %s", path, len(examples), len(records), counts)
    return examples, counts


# --- Hugging Face datasets ---------------------------------------------------------------


def _load_hf_split(name: str, split: str, cache_dir: str | None, config: str | None):
    """A `datasets.Dataset`: from a saved dataset dir, local data files, or the hub."""
    import datasets

    path = Path(name)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{name}: no split {split!r}; it has {sorted(ds)}")
            ds = ds[split]
        return ds
    if path.is_file():
        builder = _HF_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(f"{name}: cannot load {path.suffix!r} files; use one of {sorted(_HF_FILE_BUILDERS)}")
        return datasets.load_dataset(builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir)
    if path.is_dir():  # a folder of data files; datasets infers the format and splits
        return datasets.load_dataset(str(path), split=split, cache_dir=cache_dir)
    repo, default_config = HF_DATASETS.get(name, (name, None))
    return datasets.load_dataset(repo, config or default_config, split=split, cache_dir=cache_dir)


def load_hf_qa(
    name: str, split: str = DEFAULT_SPLIT, cache_dir: str | None = None, config: str | None = None
) -> list[QAExample]:
    """QA examples from a Hugging Face dataset: a hub name, a `save_to_disk` folder, or data files.

    `nq_open` (question, answer list) and `trivia_qa` (question, question_id, answer dict whose
    value, aliases and normalized_aliases all become answers; config `unfiltered.nocontext` by
    default, or `rc.nocontext`) are mapped to their hub repositories; other names load as given.
    Local .json/.jsonl/.parquet/.arrow files load through `load_dataset` with `data_files`.
    """
    ds = _load_hf_split(name, split, cache_dir, config)
    where = f"{name} split {split}"
    return [
        example_from_record(row, f"{where} row {i}", i)
        for i, row in enumerate(tqdm(ds, desc=f"reading {Path(name).name}:{split}", unit="q"))
    ]


def _parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`name`, `name:split` or `name:config:split` -> (name, config, split)."""
    parts = spec.split(":")
    if len(parts) > 3 or not all(parts):
        raise DataError(f"data spec {spec!r}: expected a path, name, name:split or name:config:split")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return parts[0], None, parts[1] if len(parts) == 2 else None


def load_qa(spec: str | os.PathLike, on_missing_positive: str = "error") -> list[QAExample]:
    """QA examples from a path or dataset name, chosen by its form.

    `*.csv` (DPR `*.qa.csv`) -> read_qa_csv; `*.jsonl` -> read_jsonl_qa; `*.json` -> DPR biencoder
    (read_biencoder_json with `on_missing_positive`); anything else -> load_hf_qa, written
    `name`, `name:split` or `name:config:split` (split defaults to `validation`, the open-domain
    test set), which also takes a saved dataset folder or a .parquet/.arrow file.
    """
    spec = str(spec)
    if os.path.exists(spec):
        target, config, split = spec, None, None
    else:
        target, config, split = _parse_spec(spec)
    suffix = Path(target).suffix
    if suffix in (".csv", ".jsonl", ".json") and split is not None:
        raise DataError(f"data spec {spec!r}: a {suffix} file has no splits")
    if suffix == ".csv":
        return read_qa_csv(target)
    if suffix == ".jsonl":
        return read_jsonl_qa(target)
    if suffix == ".json":
        return read_biencoder_json(target, on_missing_positive)[0]
    return load_hf_qa(target, split or DEFAULT_SPLIT, config=config)
