"""Checkpoints: written whole under a temporary name, then renamed; the last N kept, the best always.

    <out_dir>/checkpoints/step-00000500/
        retriever/          BiEncoder.save_pretrained (transformers folders + retriever.json + tokenizer)
        generator/          peft adapter (adapter_config.json, adapter_model.safetensors) or the full model
        training.pt         optimizer, scheduler, RNG states (torch.load(weights_only=True))
        trainer_state.json  step, data position, index version, best metric, metrics
        config.yaml         the resolved run config
    <out_dir>/checkpoints/latest, best   one line each: the folder name
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rag_e2e.config import save_config

log = logging.getLogger(__name__)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_pretrained_beside(obj, out_dir: str | os.PathLike, **kwargs) -> None:
    """`obj.save_pretrained(tmp, **kwargs)` into `<out_dir>.tmp`, then each entry renamed into
    `out_dir` (which may already hold other files, e.g. a tokenizer beside a model; an entry of
    the same name, an earlier save, is replaced): nothing is ever half-written there."""
    out, tmp = Path(out_dir), Path(f"{out_dir}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    obj.save_pretrained(str(tmp), **kwargs)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        if (out / f.name).is_dir():  # os.replace cannot replace a non-empty folder
            shutil.rmtree(out / f.name)
        os.replace(f, out / f.name)
    tmp.rmdir()


def rng_state() -> dict:
    """Every RNG that a training step draws from, as tensors and plain lists (weights_only-safe)."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": [version, list(state), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    v, s, g = state["python"]
    random.setstate((v, tuple(s), g))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir: str | os.PathLike, step: int, model, ret_tok, gen_tok, optimizer, scheduler,
                    trainer_state: dict, cfg, keep_last: int, is_best: bool = False) -> Path:
    """Write joint-training checkpoint `step` atomically; prune old ones. Returns its folder."""

    def write(tmp: Path) -> None:
        model.retriever.save_pretrained(tmp / "retriever", tokenizer=ret_tok)
        model.generator.save_pretrained(tmp / "generator")
        gen_tok.save_pretrained(tmp / "generator")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   tmp / "training.pt")
        _write_text(tmp / "trainer_state.json", json.dumps(trainer_state, indent=2))
        save_config(cfg, tmp / "config.yaml")

    return write_checkpoint(Path(out_dir) / "checkpoints", step, write, keep_last, is_best)


def write_checkpoint(root: Path, step: int, write, keep_last: int, is_best: bool = False) -> Path:
    """root/step-NNNNNNNN written whole by `write(tmp_folder)`, then renamed; `latest` (and
    `best`) point at it; all but the `keep_last` newest (and best) are deleted."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if tmp.exists():
        shutil.rmtree(tmp)  # a write that died earlier; never a finished checkpoint
    tmp.mkdir()
    write(tmp)
    if final.exists():  # the same step saved again (e.g. final == periodic): replace it whole
        old = root / f".old-{name}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _write_text(root / "latest", name)
    if is_best:
        _write_text(root / "best", name)
    prune(root, keep_last)
    log.info("saved checkpoint %s", final)
    return final


def _pointer(root: Path, which: str) -> Optional[str]:
    p = root / which
    return p.read_text().strip() if p.is_file() else None


def prune(root: Path, keep_last: int) -> None:
    keep = {_pointer(root, "best"), _pointer(root, "latest")}
    done = sorted(p.name for p in root.glob("step-*") if p.is_dir())
    keep.update(done[-max(keep_last, 1):])
    for name in done:
        if name not in keep:
            shutil.rmtree(root / name)


def find_checkpoint(path: str | os.PathLike, which: str = "latest") -> Optional[Path]:
    """A checkpoint folder from itself, a run folder (its latest/best), or None if there is none."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    name = _pointer(root, which)
    if name is None or not (root / name / "trainer_state.json").is_file():
        return None
    return root / name


def load_training_state(ckpt: Path, optimizer, scheduler, modules: Optional[dict] = None) -> dict:
    """Restore optimizer, scheduler, RNGs (and the state dicts of `modules`, by name, when the
    checkpoint holds them); return the trainer state."""
    blob = torch.load(ckpt / "training.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    for name, module in (modules or {}).items():
        module.load_state_dict(blob[name])
    set_rng_state(blob["rng"])
    return json.loads((ckpt / "trainer_state.json").read_text())

