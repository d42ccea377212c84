"""DPR-style retriever encoders: a query encoder q(x) and a document encoder d(z).

Any transformers encoder (`AutoModel`) works; the embedding is its CLS vector or the
mean of its token states, optionally L2-normalised. Query and document encoders share
weights or not. Saved as plain transformers folders, so they load without rag_e2e:

    out/query_encoder/   (config.json, model.safetensors, tokenizer files)
    out/doc_encoder/     (absent when shared)
    out/retriever.json   (pooling, normalize, shared)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel


@dataclass
class RetrieverConfig:
    query_model: str = ""  # path or hub name of the query encoder (AutoModel)
    doc_model: Optional[str] = None  # None: same as query_model
    shared: bool = False  # one set of weights for queries and documents
    from_scratch: bool = False  # random weights from the model's config (debug runs, benchmarks)
    pooling: Literal["cls", "mean"] = "cls"  # DPR uses CLS; sentence-transformers models use mean
    normalize: bool = False  # L2-normalise embeddings (cosine scores); DPR uses raw dot products
    max_query_length: int = 64
    max_passage_length: int = 256
    gradient_checkpointing: bool = False
    freeze_embeddings: bool = False  # keep the word-embedding table fixed: less optimizer state and time
    trust_remote_code: bool = False


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """(n, s, d) token states, (n, s) mask -> (n, d) embeddings."""
    assert hidden.dim() == 3 and attention_mask.shape == hidden.shape[:2]
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = attention_mask.to(hidden.dtype)[..., None]  # (n, s, 1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    raise ValueError(f"unknown pooling {pooling!r} (expected 'cls' or 'mean')")


class BiEncoder(nn.Module):
    """Query and document encoders with their pooling; weights live here, maths in `pool`."""

    def __init__(self, query_encoder: PreTrainedModel, doc_encoder: PreTrainedModel | None,
                 pooling: str = "cls", normalize: bool = False):
        super().__init__()
        self.query_encoder = query_encoder
        # A shared encoder is one module, not a copy: its gradient comes from both sides.
        self.doc_encoder = doc_encoder if doc_encoder is not None else query_encoder
        self.shared = doc_encoder is None or doc_encoder is query_encoder
        self.pooling = pooling
        self.normalize = normalize

    @property
    def dim(self) -> int:
        return self.query_encoder.config.hidden_size

    def _embed(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        emb = pool(out.last_hidden_state, attention_mask, self.pooling)  # (n, d)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def encode_queries(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(b, s) -> (b, d)"""
        return self._embed(self.query_encoder, input_ids, attention_mask)

    def encode_docs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, s) -> (n, d)"""
        return self._embed(self.doc_encoder, input_ids, attention_mask)

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer=None) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.query_encoder.save_pretrained(out / "query_encoder")
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "query_encoder")
        if not self.shared:
            self.doc_encoder.save_pretrained(out / "doc_encoder")
            if tokenizer is not None:
                tokenizer.save_pretrained(out / "doc_encoder")
        meta = {"pooling": self.pooling, "normalize": self.normalize, "shared": self.shared}
        tmp = out / "retriever.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, out / "retriever.json")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs) -> "BiEncoder":
        """Load a folder written by `save_pretrained`."""
        path = Path(path)
        meta_file = path / "retriever.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{meta_file} not found: not a folder written by BiEncoder.save_pretrained")
        meta = json.loads(meta_file.read_text())
        q = _load_saved(path / "query_encoder", **kwargs)
        d = None if meta["shared"] else _load_saved(path / "doc_encoder", **kwargs)
        return cls(q, d, pooling=meta["pooling"], normalize=meta["normalize"])


def _load_saved(folder: Path, **kwargs) -> PreTrainedModel:
    """A saved encoder as it was saved: with its pooler head only if the weights hold one."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        keys = set(json.loads(index.read_text())["weight_map"])
    else:
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
    if any(k.split(".")[0] == "pooler" or ".pooler." in k for k in keys):
        return AutoModel.from_pretrained(folder, **kwargs)
    try:
        return _without_pooler(folder, **kwargs)
    except TypeError:  # a model class without a pooler option
        return AutoModel.from_pretrained(folder, **kwargs)


def _load_encoder(name: str, trust_remote_code: bool, from_scratch: bool = False) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    # DPR checkpoints wrap a BERT: use the inner encoder so pooling is ours.
    if config.model_type == "dpr":
        from transformers import DPRContextEncoder, DPRQuestionEncoder

        is_ctx = "DPRContextEncoder" in (config.architectures or [])
        cls = DPRContextEncoder if is_ctx else DPRQuestionEncoder
        model = cls(config) if from_scratch else cls.from_pretrained(name)
        return (model.ctx_encoder if is_ctx else model.question_encoder).bert_model
    if from_scratch:
        return AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    try:  # the pooler head is unused (pooling is ours); leaving it out keeps DDP free of unused params
        return _without_pooler(name, trust_remote_code=trust_remote_code)
    except TypeError:
        return AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)


def _without_pooler(name: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """AutoModel without its pooler head. Pooler weights left unread are expected and not
    reported (transformers' load report would list them); anything else missing is."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModel.from_pretrained(name, add_pooling_layer=False, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    odd = [k for key in ("missing_keys", "unexpected_keys", "mismatched_keys") for k in info.get(key, [])
           if "pooler" not in str(k)]
    if odd:
        logging.getLogger(__name__).warning("%s: weights missing, unexpected or mismatched: %s", name, odd[:10])
    return model

def load_retriever(cfg: RetrieverConfig) -> tuple[BiEncoder, object]:
    """Build the BiEncoder and its tokenizer from a RetrieverConfig.

    `query_model` may be a folder written by `BiEncoder.save_pretrained` (a pretrained
    retriever from `train_retriever`) or any transformers encoder.
    """
    if not cfg.query_model:
        raise ValueError("retriever.query_model is empty: give a path or model name")
    src = Path(cfg.query_model)
    if (src / "retriever.json").is_file():
        enc = BiEncoder.from_pretrained(src)
        tok = AutoTokenizer.from_pretrained(src / "query_encoder")
    else:
        q = _load_encoder(cfg.query_model, cfg.trust_remote_code, cfg.from_scratch)
        if cfg.shared:
            d = None
        else:
            d = _load_encoder(cfg.doc_model or cfg.query_model, cfg.trust_remote_code, cfg.from_scratch)
        enc = BiEncoder(q, d, pooling=cfg.pooling, normalize=cfg.normalize)
        tok = AutoTokenizer.from_pretrained(cfg.query_model, trust_remote_code=cfg.trust_remote_code)
    if cfg.freeze_embeddings:
        for m in {id(enc.query_encoder): enc.query_encoder, id(enc.doc_encoder): enc.doc_encoder}.values():
            m.get_input_embeddings().requires_grad_(False)
    if cfg.gradient_checkpointing:
        enc.query_encoder.gradient_checkpointing_enable()
        if not enc.shared:
            enc.doc_encoder.gradient_checkpointing_enable()
    return enc, tok

