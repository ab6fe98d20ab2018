"""The one batched hooked-forward engine every circuitkd analysis runs on.

:func:`run` takes any supported bridge (native encoder or causal model, BERT, ViT) and a
dataset — a tensor of token ids or pixels, a list of unequal-length token sequences
(right-padded here, with an attention mask), a :class:`~circuitkd.data.task.Split` or a
:class:`~circuitkd.types.PromptPairs` (its clean or corrupt side) — and runs it in
batches on the model's own device (a GPU when the model was built on one; the model is
never moved), under ``torch.inference_mode`` unless ``grad=True``.

Activations are read at typed :class:`~circuitkd.hooks.Site` s, either whole
(``sites=[...]``: concatenated over the dataset) or as streaming reductions
(``reducers={...}``: :class:`Mean`, :class:`TokenClassMean`, :class:`AttentionMass`,
or any object with ``sites``, ``update(acts, batch)`` and ``result()``), so memory stays
flat as the dataset grows. Hooks are scoped (:func:`circuitkd.hooks.edit_hooks`) and
removed in ``finally``; extra editing hooks can ride along (``fwd_hooks``).

Example::

    res = run(model, task.id_test, sites=[Site(0, "resid_post")],
              reducers={"neg": AttentionMass(src_mask=task.id_test.token_classes["negation"])})
    res.logits                    # Float[batch ...] raw bridge output
    res.acts[Site(0, "resid_post")]
    res.reduced["neg"]            # Float[layer head]
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Protocol, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site, all_sites, backbone_of, capture_hooks, check_site, edit_hooks, n_heads, n_layers
from circuitkd.models.build import model_device
from circuitkd.types import PromptPairs


# ---------------------------------------------------------------------------- inputs


def check_pairs(model, pairs: PromptPairs) -> None:
    """Raise :class:`CircuitKDError` naming what is wrong when ``pairs`` cannot be fed to ``model``
    (the one check every patching and circuit function runs on its pairs)."""
    if not isinstance(pairs, PromptPairs):
        raise CircuitKDError(f"pairs must be a PromptPairs, got {type(pairs).__name__}")
    if pairs.clean.shape != pairs.corrupt.shape:  # PromptPairs checks this too; fields may be reassigned
        raise CircuitKDError(
            f"clean and corrupt differ in shape: clean {tuple(pairs.clean.shape)}, corrupt {tuple(pairs.corrupt.shape)}"
        )
    if len(pairs) == 0:
        raise CircuitKDError("pairs is empty")
    x = pairs.clean
    if backbone_of(model) == "vit":
        if not x.is_floating_point() or x.dim() != 4:
            raise CircuitKDError(f"ViT needs pixel inputs Float[batch channel height width], got {tuple(x.shape)} "
                                 f"of {x.dtype}")
        return
    if x.dim() != 2 or x.is_floating_point():
        raise CircuitKDError(f"text models need Int[batch pos] token ids, got {tuple(x.shape)} of {x.dtype}")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and x.shape[1] > n_ctx:
        raise CircuitKDError(f"inputs have {x.shape[1]} tokens but the model's context is {n_ctx} (n_ctx)")
    d_vocab = getattr(model.cfg, "d_vocab", None)
    top = int(torch.maximum(pairs.clean.max(), pairs.corrupt.max()))
    if d_vocab and d_vocab > 0 and top >= d_vocab:
        raise CircuitKDError(f"pairs hold token id {top} but the model's vocabulary has {d_vocab} ids")


@dataclass
class Batch:
    """One batch as the engine sees it: ``index`` is the slice of the dataset it covers."""

    inputs: Tensor
    attention_mask: Optional[Tensor]
    index: slice


def pad_right(seqs: Sequence[Tensor], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad unequal-length 1-D token tensors: ``(Int[batch pos] tokens, Int[batch pos] mask)``."""
    if len(seqs) == 0:
        raise CircuitKDError("cannot pad an empty list of sequences")
    for i, s in enumerate(seqs):
        if s.dim() != 1:
            raise CircuitKDError(f"sequence {i} must be 1-D token ids, got shape {tuple(s.shape)}")
    pos = max(int(s.shape[0]) for s in seqs)
    tokens = torch.full((len(seqs), pos), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), pos), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = 1
    return tokens, mask


def as_inputs(data: Any, attention_mask: Optional[Tensor] = None, *, which: str = "clean",
              pad_id: int = 0) -> tuple[Tensor, Optional[Tensor]]:
    """``(inputs, attention_mask)`` from a tensor, a list of token sequences, a Split or PromptPairs."""
    if isinstance(data, PromptPairs):
        if which not in ("clean", "corrupt"):
            raise CircuitKDError(f"which must be 'clean' or 'corrupt', got {which!r}")
        return getattr(data, which), data.attention_mask if attention_mask is None else attention_mask
    if hasattr(data, "inputs") and hasattr(data, "labels"):  # a task Split
        return data.inputs, data.attention_mask if attention_mask is None else attention_mask
    if isinstance(data, (list, tuple)):
        if attention_mask is not None:
            raise CircuitKDError("pass either a list of sequences (padded here) or an attention_mask, not both")
        return pad_right(list(data), pad_id)
    if isinstance(data, Tensor):
        if attention_mask is not None and (data.dim() != 2 or attention_mask.shape != data.shape):
            raise CircuitKDError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match inputs {tuple(data.shape)}"
            )
        return data, attention_mask
    raise CircuitKDError(f"cannot run on inputs of type {type(data).__name__}")


def pair_batches(pairs: PromptPairs, batch_size: int, device: torch.device | str) -> Iterable[PromptPairs]:
    """``pairs`` in consecutive batches of ``batch_size`` on ``device`` (the last one may be smaller): the
    one batch loop of every analysis that runs on pairs (patching, circuit discovery)."""
    if batch_size < 1:
        raise CircuitKDError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(pairs), batch_size):
        yield pairs[start:start + batch_size].to(device)


def iter_batches(inputs: Tensor, attention_mask: Optional[Tensor], batch_size: int,
                 device: torch.device) -> Iterable[Batch]:
    """Batches of ``batch_size`` on ``device`` (the last one may be smaller)."""
    if batch_size < 1:
        raise CircuitKDError(f"batch_size must be >= 1, got {batch_size}")
    n = int(inputs.shape[0])
    for start in range(0, n, batch_size):
        idx = slice(start, min(start + batch_size, n))
        mask = None if attention_mask is None else attention_mask[idx].to(device)
        yield Batch(inputs[idx].to(device), mask, idx)


def forward(model, inputs: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """The raw bridge output for one batch (pixels for ViT; tokens with an optional mask otherwise)."""
    if inputs.is_floating_point() or attention_mask is None:
        return model(inputs)
    return model(inputs, attention_mask=attention_mask)


def grad_context(grad: bool):
    return nullcontext() if grad else torch.inference_mode()


# ---------------------------------------------------------------------------- reducers

class Reducer(Protocol):
    """A streaming reduction: the sites it reads, one update per batch, and its result."""

    sites: list[Site]

    def update(self, acts: Mapping[Site, Tensor], batch: Batch) -> None: ...

    def result(self) -> Tensor: ...


def _real(batch: Batch, act: Tensor) -> Tensor:
    """``Float[batch pos]`` weights: 1 on real tokens, 0 on padding."""
    if batch.attention_mask is None:
        return torch.ones(act.shape[:2], dtype=act.dtype, device=act.device)
    return batch.attention_mask.to(act.dtype)


class Mean:
    """Mean of a site's activation over examples and (real, unpadded) positions.

    Result: the activation's trailing shape (``[d_model]``, ``[head d_head]``,
    ``[head dest_pos src_pos]`` for patterns, averaged over examples only).
    ``over_positions=False`` keeps the position axis: the mean over the examples with a real token at
    each position (zero where none has one), what mean-ablating a per-position activation needs.
    """

    def __init__(self, site: Site, *, over_positions: bool = True):
        self.site = Site(site.layer, site.kind)
        self.sites = [self.site]
        self.over_positions = over_positions and site.kind != "pattern"
        self.total: Optional[Tensor] = None
        self.count: Any = 0

    def update(self, acts: Mapping[Site, Tensor], batch: Batch) -> None:
        act = acts[self.site].double()
        if self.site.kind == "pattern":  # [batch head dest src]: no position axis to weight
            total, count = act.sum(dim=0), act.shape[0]
        else:
            w = _real(batch, act)
            w = w.reshape(w.shape + (1,) * (act.dim() - 2))
            if self.over_positions:
                total, count = (act * w).sum(dim=(0, 1)), w.sum()
            else:
                total, count = (act * w).sum(dim=0), w.sum(dim=0)  # per position: [pos 1 ...]
        self.total = total if self.total is None else self.total + total
        self.count = self.count + count

    def result(self) -> Tensor:
        if self.total is None:
            raise CircuitKDError(f"Mean({self.site}) saw no data")
        count = self.count.clamp_min(1) if isinstance(self.count, Tensor) else self.count
        return (self.total / count).float()


class TokenClassMean:
    """Mean of a site's activation over the token positions of one class (e.g. negation words).

    ``token_mask``: ``Bool[n pos]`` over the whole dataset (a Split's ``token_classes[name]``).
    Result: the activation's per-position shape (``[d_model]`` or ``[head d_head]``).
    """

    def __init__(self, site: Site, token_mask: Tensor):
        if site.kind == "pattern":
            raise CircuitKDError("TokenClassMean averages per-position activations; use AttentionMass for patterns")
        self.site = Site(site.layer, site.kind)
        self.sites = [self.site]
        self.token_mask = token_mask
        self.total: Optional[Tensor] = None
        self.count: Any = 0

    def update(self, acts: Mapping[Site, Tensor], batch: Batch) -> None:
        act = acts[self.site].double()
        m = self.token_mask[batch.index].to(act.device)
        if m.shape != act.shape[:2]:
            raise CircuitKDError(
                f"token mask shape {tuple(m.shape)} does not match activations {tuple(act.shape[:2])} at {self.site}"
            )
        w = m.to(act.dtype)
        w = w.reshape(w.shape + (1,) * (act.dim() - 2))
        total = (act * w).sum(dim=(0, 1))
        self.total = total if self.total is None else self.total + total
        self.count = self.count + w.sum()

    def result(self) -> Tensor:
        if self.total is None:
            raise CircuitKDError(f"TokenClassMean({self.site}) saw no data")
        if float(self.count) == 0:
            raise CircuitKDError(f"TokenClassMean({self.site}): the token class marks no positions")
        return (self.total / self.count).float()


class AttentionMass:
    """Per-head attention mass on chosen source positions, averaged over examples.

    ``src_mask``: ``Bool[n pos]`` marking the source positions (a token class).
    ``dest``: "read" (the read-out position ``read_pos``: 0 for CLS, -1 for the last real
    token of a causal model), "all" (mean over real destination positions) or an int.
    ``layers``: the layers to read (default all). Result: ``Float[layer head]``.
    """

    def __init__(self, model, src_mask: Tensor, *, dest: Any = "read", read_pos: int = 0,
                 layers: Optional[Sequence[int]] = None):
        self.layers = list(range(n_layers(model))) if layers is None else list(layers)
        self.sites = [check_site(model, Site(layer, "pattern")) for layer in self.layers]
        self.src_mask, self.dest, self.read_pos = src_mask, dest, read_pos
        self.total = torch.zeros(len(self.layers), n_heads(model), dtype=torch.float64)
        self.count = 0

    def update(self, acts: Mapping[Site, Tensor], batch: Batch) -> None:
        src = self.src_mask[batch.index]
        for i, site in enumerate(self.sites):
            pattern = acts[site].double()  # [b h dest src]
            mass = (pattern * src.to(pattern.device, pattern.dtype)[:, None, None, :]).sum(-1)  # [b h dest]
            if self.dest == "all":
                w = _real(batch, pattern[:, 0]).to(mass.dtype)
                per_ex = (mass * w[:, None]).sum(-1) / w.sum(-1, keepdim=True)
            elif self.dest == "read":
                if self.read_pos == -1 and batch.attention_mask is not None:
                    last = batch.attention_mask.long().sum(1) - 1
                    per_ex = mass[torch.arange(mass.shape[0], device=mass.device), :, last]
                else:
                    per_ex = mass[:, :, self.read_pos]
            else:
                per_ex = mass[:, :, int(self.dest)]
            self.total[i] += per_ex.sum(0).cpu()
        self.count += int(batch.inputs.shape[0])

    def result(self) -> Float[Tensor, "layer head"]:
        if self.count == 0:
            raise CircuitKDError("AttentionMass saw no data")
        return (self.total / self.count).float()


# ---------------------------------------------------------------------------- run

@dataclass
class RunResult:
    """What :func:`run` returns: the raw output, whole activations, and reductions."""

    logits: Optional[Tensor] = None
    acts: dict = field(default_factory=dict)
    reduced: dict = field(default_factory=dict)


def run(
    model,
    data: Any,
    *,
    sites: Iterable[Site] = (),
    reducers: Optional[Mapping[str, Any]] = None,
    batch_size: int = 64,
    grad: bool = False,
    attention_mask: Optional[Tensor] = None,
    which: str = "clean",
    fwd_hooks: Sequence[tuple[str, Any]] = (),
    keep_logits: bool = True,
    acts_device: Optional[torch.device | str] = None,
) -> RunResult:
    """Run ``model`` over ``data`` in batches, collecting activations and streaming reductions.

    Args:
        data: ``Int[batch pos]`` tokens, ``Float[batch channel height width]`` pixels, a list of
            1-D token tensors (right-padded, mask built), a ``Split``, or ``PromptPairs``
            (``which`` side).
        sites: activations to keep whole, concatenated over the dataset (``RunResult.acts``).
        reducers: name -> streaming reducer (``RunResult.reduced``); memory does not grow with the data.
        grad: keep the autograd graph (no inference mode); activations stay attached
            and ``retain_grad()`` is called on them (``.grad`` fills in when the data fit one batch;
            over several batches the concatenation is a new tensor).
        fwd_hooks: extra ``(hook_name, fn)`` hooks (e.g. edits) active during every forward.
        keep_logits: concatenate the raw outputs (``RunResult.logits``).
        acts_device: where whole activations are stored (default: the model's device).
    """
    inputs, mask = as_inputs(data, attention_mask, which=which)
    device = model_device(model)
    sites = [check_site(model, s) for s in sites]
    reducers = dict(reducers or {})
    want = {Site(s.layer, s.kind) for s in sites}
    for r in reducers.values():
        want.update(Site(s.layer, s.kind) for s in r.sites)
    keep = {Site(s.layer, s.kind) for s in sites}
    result = RunResult()
    chunks: dict[Site, list[Tensor]] = {s: [] for s in keep}
    logit_chunks: list[Tensor] = []
    for batch in iter_batches(inputs, mask, batch_size, device):
        store: dict = {}
        hooks = capture_hooks(model, sorted(want), store, attention_mask=batch.attention_mask, grad=grad)
        with grad_context(grad), edit_hooks(model, list(fwd_hooks) + hooks):
            out = forward(model, batch.inputs, batch.attention_mask)
            for r in reducers.values():
                r.update(store, batch)
        for s in keep:
            act = store[s]
            chunks[s].append(act if acts_device is None else act.to(acts_device))
        if keep_logits:
            logit_chunks.append(out)
    # one batch: the stored tensors themselves (so that with grad=True their .grad fills in)
    result.acts = {s: (c[0] if len(c) == 1 else torch.cat(c)) for s, c in chunks.items()}
    if keep_logits and logit_chunks:
        result.logits = torch.cat(logit_chunks)
    result.reduced = {name: r.result() for name, r in reducers.items()}
    return result


def collect(model, data: Any, kinds: Sequence[str], **kwargs) -> dict:
    """Whole activations of every layer for the given site kinds: ``{Site: Tensor}``."""
    return run(model, data, sites=all_sites(model, kinds), keep_logits=False, **kwargs).acts
