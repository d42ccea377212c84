"""Every YAML in configs/ loads into its typed config; each opens with the command that runs it."""

from pathlib import Path

import pytest

from rag_e2e.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def config_class(path: Path):
    if path.name == "demo.yaml":
        from rag_e2e.demo import DemoConfig
        return DemoConfig
    if path.name.startswith("index_"):
        from index_build.encode import IndexBuildConfig
        return IndexBuildConfig
    if path.name.startswith("retriever_"):
        from rag_e2e.train_retriever import RetrieverTrainConfig
        return RetrieverTrainConfig
    from rag_e2e.pipeline import TrainConfig
    return TrainConfig


def test_the_expected_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "debug_tiny.yaml", "rag_16gb.yaml", "rag_sequence_nq.yaml", "rag_token_nq.yaml",
            "rag_sequence_tqa.yaml", "rag_token_tqa.yaml", "retriever_demo.yaml", "retriever_dpr_nq.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_names_its_command(path):
    cfg = load_config(config_class(path), path)
    assert cfg is not None
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("scripts/" in first or "python -m" in first), first


def test_paper_configs_are_the_paper_settings():
    from rag_e2e.pipeline import TrainConfig

    for name, marg in (("rag_sequence_nq", "sequence"), ("rag_token_nq", "token"),
                       ("rag_sequence_tqa", "sequence"), ("rag_token_tqa", "token")):
        cfg = load_config(TrainConfig, Path(CONFIGS[0]).parent / f"{name}.yaml")
        assert cfg.generator.model == "facebook/bart-large" and cfg.rag.marginalize == marg
        assert cfg.rag.mode == "paper" and cfg.rag.n_docs in (5, 10) and cfg.rag.label_smoothing == 0.1
    cfg = load_config(TrainConfig, Path(CONFIGS[0]).parent / "rag_16gb.yaml")
    assert cfg.generator.peft == "lora" and cfg.mixed_precision == "bf16" and cfg.generator.gradient_checkpointing
