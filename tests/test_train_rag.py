"""The joint training pipeline end to end on debug_tiny.yaml: resume, checkpoints, NaN guard, refusals."""

import json
from pathlib import Path

import pytest
import torch

from rag_e2e import train_rag
from rag_e2e.checkpoint import find_checkpoint
from rag_e2e.config import load_config
from rag_e2e.pipeline import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "debug_tiny.yaml"


def cfg_for(tmp_path, *overrides):
    base = [f"out_dir={tmp_path}", f"data.passages={ROOT}/tests/fixtures/tiny/psgs.tsv",
            f"data.train={ROOT}/tests/fixtures/tiny/train.jsonl", f"data.dev={ROOT}/tests/fixtures/tiny/dev.jsonl",
            f"retriever.query_model={ROOT}/configs/tiny/retriever", f"generator.model={ROOT}/configs/tiny/generator"]
    return load_config(TrainConfig, CONFIG, base + list(overrides))


def test_debug_tiny_end_to_end(tmp_path):
    out = tmp_path / "run"
    metrics = train_rag.main(["--config", str(CONFIG)] + [f"{o}" for o in [
        f"out_dir={out}", f"data.passages={ROOT}/tests/fixtures/tiny/psgs.tsv",
        f"data.train={ROOT}/tests/fixtures/tiny/train.jsonl", f"data.dev={ROOT}/tests/fixtures/tiny/dev.jsonl",
        f"retriever.query_model={ROOT}/configs/tiny/retriever", f"generator.model={ROOT}/configs/tiny/generator"]])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["steps"] == 8 and {"em", "f1", "recall@1", "recall@5"} <= set(saved)
    assert metrics["index_version"] == 2  # rebuilt at steps 4 and 8
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())
    assert find_checkpoint(out).name == "step-00000008"
    # The export loads with plain transformers, without rag_e2e.
    from transformers import AutoModel, AutoModelForSeq2SeqLM

    AutoModelForSeq2SeqLM.from_pretrained(out / "export" / "generator")
    AutoModel.from_pretrained(out / "export" / "query_encoder")

    # Evaluation entry point on the run's checkpoint.
    from rag_e2e import evaluate

    ev = evaluate.main(["--checkpoint", str(out / "checkpoints" / "step-00000008"), "--data", f"{ROOT}/tests/fixtures/tiny/test.qa.csv",
                        "--out", str(tmp_path / "eval"), "decode.mode=rag_token", "decode.num_beams=2"])
    assert ev["count"] == 16 and "recall@5" in ev and ev["step"] == 8
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert len(lines) == 16 and len(rec["passages"]) == 3
    assert abs(sum(p["prior"] for p in rec["passages"]) - 1) < 1e-3
    assert abs(sum(p["posterior"] for p in rec["passages"]) - 1) < 1e-3
    with pytest.raises(SystemExit, match="metrics.json exists"):
        evaluate.main(["--checkpoint", str(out), "--data", f"{ROOT}/tests/fixtures/tiny/test.qa.csv",
                       "--out", str(tmp_path / "eval")])


def test_evaluate_rejects_malformed_data_before_model_work(tmp_path, monkeypatch):
    from rag_e2e import evaluate, pipeline
    from rag_e2e.qa_data import DataError

    bad = tmp_path / "bad.qa.csv"
    bad.write_text("what is x ?\t['a']\nwhat is y ?\tnot a list\n")
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text("{}")
    monkeypatch.setattr(pipeline, "build_components", lambda *a, **k: pytest.fail("model work started"))
    with pytest.raises(DataError, match=r"bad.qa.csv.*2"):
        evaluate.main(["--checkpoint", str(ckpt), "--data", str(bad), "--out", str(tmp_path / "ev")])


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    over = ["data.dev=", "eval_every=0", "save_every=4", "export=false"]
    full = train_rag.train(cfg_for(tmp_path / "a", *over))
    first = train_rag.train(cfg_for(tmp_path / "b", *over), stop_after=4)
    assert len(first["losses"]) == 4
    with pytest.raises(SystemExit, match="already holds a run"):
        train_rag.train(cfg_for(tmp_path / "b", *over))
    rest = train_rag.train(cfg_for(tmp_path / "b", *over), resume=True)
    torch.testing.assert_close(torch.tensor(first["losses"] + rest["losses"]), torch.tensor(full["losses"]),
                               rtol=1e-5, atol=1e-5)


def test_interrupted_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    from rag_e2e import checkpoint

    over = ["data.dev=", "eval_every=0", "save_every=4", "export=false"]
    real_save = torch.save
    calls = {"n": 0}

    def flaky(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies halfway through its files
            raise OSError("disk full")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", flaky)
    with pytest.raises(OSError, match="disk full"):
        train_rag.train(cfg_for(tmp_path, *over))
    ck = find_checkpoint(tmp_path)
    assert ck.name == "step-00000004"
    blob = torch.load(ck / "training.pt", weights_only=True)
    assert "optimizer" in blob and json.loads((ck / "trainer_state.json").read_text())["step"] == 4
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    rest = train_rag.train(cfg_for(tmp_path, *over), resume=True)  # the leftover temporary folder is replaced
    assert rest["steps"] == 8 and find_checkpoint(tmp_path).name == "step-00000008"


def test_non_finite_loss_skips_then_stops(tmp_path, monkeypatch, caplog):
    from rag_e2e.model import RagModel

    real_forward = RagModel.forward
    state = {"n": 0}

    def nan_forward(self, *a, **k):
        out = real_forward(self, *a, **k)
        state["n"] += 1
        if state["n"] in (2, 3) or state["n"] >= 6:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(RagModel, "forward", nan_forward)
    with pytest.raises(RuntimeError, match="3 consecutive non-finite losses"):
        train_rag.train(cfg_for(tmp_path, "data.dev=", "eval_every=0", "save_every=0", "max_bad_steps=3",
                                "optim.max_steps=20"))
    assert "non-finite loss" in caplog.text and "step skipped" in caplog.text
