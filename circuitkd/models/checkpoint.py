"""Checkpoints: a folder with the weights, the spec and the run config, written atomically.

A checkpoint is written into a temporary sibling folder and renamed into place, so a
crash mid-save never leaves a half-written checkpoint where a good one was. Each save
records ``manifest.json`` (the spec and a sha256 of every file); loading verifies it and
names the damaged file, and :func:`is_checkpoint` is False for a damaged folder, so a
re-run retrains it instead of trusting it.
"""
from __future__ import annotations

import hashlib
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
MANIFEST = "manifest.json"


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_dir(path: str | Path, write) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``path``, replacing it only on success.

    The folder gets the permissions a plain ``mkdir`` would (``tempfile`` makes it owner-only), so a
    run folder on a shared machine is as readable as the user's other files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
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
    """Write ``text`` to ``path`` through a temporary file and a rename, with the permissions a plain
    ``open(path, "w")`` would give it (``tempfile`` makes it owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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
        files = {f.name: _sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"spec": spec.to_dict(), "files": files}, indent=2, sort_keys=True))

    return atomic_write_dir(path, write)


_HASHES: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime) so a load after a check hashes once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CircuitKDError` naming the first file of ``path`` that is missing or damaged.

    Checks each file against ``manifest.json``; a folder saved before manifests existed is
    checked for a readable ``spec.json`` only (its ``model.pt`` is checked when loaded).
    """
    path = Path(path)
    if not path.exists():
        raise CircuitKDError(f"checkpoint not found: {path}")
    for name in (WEIGHTS, SPEC):
        if not (path / name).is_file():
            raise CircuitKDError(f"{path} is not a circuitkd checkpoint (needs {WEIGHTS} and {SPEC}; {name} is missing)")
    manifest_path = path / MANIFEST
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            files = dict(manifest["files"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CircuitKDError(f"checkpoint {path}: {MANIFEST} is damaged ({exc})") from None
        for name, digest in sorted(files.items()):
            f = path / name
            if not f.is_file():
                raise CircuitKDError(f"checkpoint {path}: {name} is missing (listed in its {MANIFEST})")
            if _sha256(f) != digest:
                raise CircuitKDError(f"checkpoint {path}: {name} is damaged (its sha256 does not match "
                                     f"{MANIFEST}); delete the folder to retrain it")
    read_spec(path)


def read_spec(path: str | Path) -> ModelSpec:
    """The :class:`ModelSpec` in a checkpoint's ``spec.json``; a CircuitKDError naming it when invalid."""
    spec_path = Path(path) / SPEC
    try:
        data = json.loads(spec_path.read_text())
    except (OSError, ValueError) as exc:
        raise CircuitKDError(f"checkpoint {path}: {SPEC} is not valid JSON ({exc})") from None
    try:
        return ModelSpec.from_dict(data)
    except (CircuitKDError, TypeError) as exc:
        raise CircuitKDError(f"checkpoint {path}: {SPEC} is not a valid model spec ({exc})") from None


def is_checkpoint(path: str | Path) -> bool:
    """True when ``path`` holds a complete checkpoint whose files match their manifest."""
    try:
        verify_checkpoint(path)
    except CircuitKDError:
        return False
    return True


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    verify_checkpoint(path)
    try:
        state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError... on a truncated file
        raise CircuitKDError(f"checkpoint {path}: {WEIGHTS} cannot be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'empty or truncated'})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise CircuitKDError(f"checkpoint {path}: {WEIGHTS} holds no model weights")
    return state


def check_spec(path: str | Path, expected: ModelSpec) -> None:
    """Raise :class:`CircuitKDError` when the checkpoint at ``path`` holds a model other than ``expected``.

    Fields ``expected`` leaves None (sizes filled from a task) and ``seed`` are not compared.
    """
    stored = read_spec(path)
    diff = [f"{k}: stored {getattr(stored, k)!r}, wanted {v!r}" for k, v in expected.to_dict().items()
            if v is not None and k != "seed" and getattr(stored, k) != v]
    if diff:
        raise CircuitKDError(f"checkpoint {path} holds a different model ({'; '.join(diff)}): "
                             "choose another folder or delete it")


def load_checkpoint(path: str | Path, *, device: Optional[str | torch.device] = None,
                    dtype: Optional[torch.dtype] = None, expect: Optional[ModelSpec] = None):
    """Rebuild the model saved at ``path`` from its spec and load its weights (outputs identical).

    ``expect``: refuse a checkpoint whose spec differs from this one (see :func:`check_spec`).
    """
    path = Path(path)
    state = read_checkpoint_state(path)
    spec = read_spec(path)
    if expect is not None:
        check_spec(path, expect)
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
