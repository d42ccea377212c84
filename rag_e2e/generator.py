"""The seq2seq generator p(y|x,z): any AutoModelForSeq2SeqLM, fully fine-tuned or with a peft adapter.

The adapter is a config choice (`peft: lora | ia3 | adalora | prefix | none`), so every
method peft offers for seq2seq models goes through the same path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedModel


@dataclass
class GeneratorConfig:
    model: str = ""  # path or hub name of an AutoModelForSeq2SeqLM (BART, T5)
    tokenizer: Optional[str] = None  # None: same as model
    from_scratch: bool = False  # build from the model's config with random weights (demo, benchmarks)
    max_source_length: int = 300  # question + passage tokens; only the passage is truncated
    max_passage_length: int = 256  # passage tokens kept at tokenization time
    max_target_length: int = 64
    max_question_length: int = 64
    peft: Literal["none", "lora", "ia3", "adalora", "prefix"] = "none"
    lora_r: int = 16  # higher = more capacity, more memory
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    prefix_tokens: int = 20  # prefix tuning: virtual tokens
    adalora_total_step: int = 1000  # AdaLoRA's budget schedule needs the run length
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False


def peft_config(cfg: GeneratorConfig):
    """The peft config for `cfg.peft` (None for full fine-tuning)."""
    import peft

    task = peft.TaskType.SEQ_2_SEQ_LM
    if cfg.peft == "none":
        return None
    if cfg.peft == "lora":
        return peft.LoraConfig(task_type=task, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                               lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules)
    if cfg.peft == "adalora":
        return peft.AdaLoraConfig(task_type=task, init_r=cfg.lora_r, target_r=max(1, cfg.lora_r // 2),
                                  lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  target_modules=cfg.lora_target_modules, total_step=cfg.adalora_total_step)
    if cfg.peft == "ia3":
        ff = [m for m in cfg.lora_target_modules if m in ("fc1", "fc2", "wo", "dense", "out_proj")]
        return peft.IA3Config(task_type=task, target_modules=cfg.lora_target_modules, feedforward_modules=ff)
    if cfg.peft == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=cfg.prefix_tokens)
    raise ValueError(f"generator.peft: unknown method {cfg.peft!r}")


def wrap_peft(model: PreTrainedModel, cfg: GeneratorConfig):
    pc = peft_config(cfg)
    if pc is None:
        return model
    import peft

    return peft.get_peft_model(model, pc)


def load_generator(cfg: GeneratorConfig, tokenizer=None):
    """-> (model, tokenizer). The model carries its peft adapter if one is configured."""
    if not cfg.model:
        raise ValueError("generator.model is empty: give a path or model name")
    if cfg.from_scratch and cfg.peft != "none":
        raise ValueError("generator.from_scratch with generator.peft: adapters on random base weights "
                         "could not be restored from a checkpoint; use peft: none to train from scratch")
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.from_scratch:
        config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        if cfg.peft != "none":  # frozen embeddings: checkpointed blocks still need grad-carrying inputs
            model.enable_input_require_grads()
    return wrap_peft(model, cfg), tokenizer


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def merged_generator(model):
    """A plain transformers model with any LoRA adapter folded into its weights."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
