"""Checkpoints: a folder with the weights, the spec and the run config, written atomically.

A checkpoint is written into a temporary sibling folder and renamed into place, so a
crash mid-save never leaves a half-written checkpoint where a good one was.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from circuitkd.config import ModelSpec
from circuitkd.errors import CircuitKDError
from circuitkd.models.build import build_model, spec_of

WEIGHTS = "model.pt"
SPEC = "spec.json"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


def atomic_write_dir(path: str | Path, write) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``path``, replacing it only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every weight of a bridge, keyed by the wrapped module's names.

    The bridge's own ``state_dict`` omits some wrapped parameters (the ViT patch and position
    embeddings, for one), so checkpoints use the wrapped module's complete one.
    """
    inner = getattr(model, "original_model", None)
    return (inner if inner is not None else model).state_dict()


def load_full_state_dict(model, weights: dict[str, torch.Tensor]) -> None:
    inner = getattr(model, "original_model", None)
    (inner if inner is not None else model).load_state_dict(weights, strict=True)


def save_checkpoint(model, path: str | Path, *, config: Optional[dict[str, Any]] = None,
                    tokenizer: Any = None, extra_state: Optional[dict[str, Any]] = None) -> Path:
    """Save ``model`` (a circuitkd bridge) to the folder ``path``, atomically.

    The folder holds ``model.pt`` (the bridge state dict, plus ``extra_state`` such as an
    optimiser for resuming), ``spec.json`` and ``config.json`` (whatever produced it).
    """
    spec = spec_of(model)

    def write(tmp: Path) -> None:
        state = {"model": {k: v.detach().cpu() for k, v in full_state_dict(model).items()}}
        if extra_state:
            state.update(extra_state)
        torch.save(state, tmp / WEIGHTS)
        spec.to_json(tmp / SPEC)
        (tmp / CONFIG).write_text(json.dumps(config or {}, indent=2, sort_keys=True, default=str))
        if tokenizer is not None and hasattr(tokenizer, "save"):
            tokenizer.save(tmp / TOKENIZER)

    return atomic_write_dir(path, write)


def is_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / WEIGHTS).is_file() and (path / SPEC).is_file()


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CircuitKDError(f"checkpoint not found: {path}")
    if not is_checkpoint(path):
        raise CircuitKDError(f"{path} is not a circuitkd checkpoint (needs {WEIGHTS} and {SPEC})")
    return torch.load(path / WEIGHTS, map_location="cpu", weights_only=False)


def load_checkpoint(path: str | Path, *, device: Optional[str | torch.device] = None,
                    dtype: Optional[torch.dtype] = None):
    """Rebuild the model saved at ``path`` from its spec and load its weights (outputs identical)."""
    path = Path(path)
    state = read_checkpoint_state(path)
    spec = ModelSpec.from_json(path / SPEC)
    # Pretrained weights come from the checkpoint itself: do not fetch them again.
    model = build_model(spec.replace(pretrained=None) if spec.pretrained else spec, device=device, dtype=dtype)
    if spec.pretrained:
        setattr(model, "circuitkd_spec", spec)
    weights = state["model"]
    own = full_state_dict(model)
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    bad_shapes = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs spec {tuple(own[k].shape)}"
        for k in set(own) & set(weights) if weights[k].shape != own[k].shape
    ]
    if missing or unexpected or bad_shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if bad_shapes:
            parts.append("shape mismatch " + "; ".join(sorted(bad_shapes)[:5]))
        raise CircuitKDError(f"checkpoint {path} does not match its spec ({spec.backbone}): " + ", ".join(parts))
    load_full_state_dict(model, weights)
    model.eval()
    return model


def load_config(path: str | Path) -> dict[str, Any]:
    p = Path(path) / CONFIG
    if not p.exists():
        raise CircuitKDError(f"checkpoint {path} has no {CONFIG}")
    return json.loads(p.read_text())
