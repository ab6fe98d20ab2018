"""Typed activation sites and the hook discipline every circuitkd analysis uses.

This is the only module that turns an activation site into a TransformerLens-bridge hook
name. A :class:`Site` names *what* is read or edited (the residual stream before a
layer, one head's query, an MLP's output); :func:`hook_name` knows *where* each
backbone exposes it, including its quirks:

- BERT is post-LN: the bridge's ``hook_attn_out`` is an alias of ``ln1.hook_out`` (the
  normalised residual) and ``hook_resid_mid`` an alias of ``ln2.hook_in``. The attention's
  own write is ``attn.o.hook_out``; the true mid-block residual is ``ln1.hook_out``.
- Per-head outputs are not a hook (``hook_result`` raises ``NotImplementedError`` on
  bridges): they are computed from ``attn.hook_z`` and ``W_O`` by :func:`head_output`.
  **Convention**: a head's output excludes the attention bias ``b_O``, so
  ``head_output(...).sum(head) + b_O == attn_out`` (the bias is a constant that no
  head owns; patching a head never moves it).
- HF attention (BERT, ViT) ignores ``attn.hook_pattern``: its pattern is computed from
  ``hook_q``/``hook_k``, the scale and the padding mask (:func:`pattern_from_qk`) and can
  be read but not patched. Pattern sites exist for editing only on native models.

Hooks are attached with :func:`edit_hooks` / :func:`capture`, context managers that
remove exactly the hooks they added in ``finally`` (also after an exception), in the
manner of TransformerLens' scoped hooks.

Example::

    with capture(model, [Site(0, "head_out"), Site(1, "pattern")], attention_mask=mask) as acts:
        model(tokens, attention_mask=mask)
    acts[Site(0, "head_out")]   # Float[batch pos head d_model]
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.errors import CircuitKDError

#: Every site kind. ``layer`` is None only for "embed" (the residual entering block 0)
#: and "final" (the residual leaving the last block, before any final norm).
KINDS = (
    "embed", "resid_pre", "resid_mid", "resid_post", "final",
    "attn_out", "head_out", "z", "q", "k", "v", "pattern", "mlp_out",
)
HEAD_KINDS = ("head_out", "z", "q", "k", "v", "pattern")
_LAYERLESS = ("embed", "final")

HookFn = Callable[..., Optional[Tensor]]


@dataclass(frozen=True, order=True)
class Site:
    """One activation site: ``Site(layer, kind, head=None)``.

    ``kind`` is one of :data:`KINDS`. ``head`` may be given for per-head kinds
    (``head_out z q k v pattern``) to select one head; captured tensors always hold all
    heads, ``head`` is used by patching and for validation.

    Shapes of the captured activation (batch first):
    ``resid_* / attn_out / mlp_out / embed / final``: ``[batch pos d_model]``;
    ``q k v z``: ``[batch pos head d_head]``; ``head_out``: ``[batch pos head d_model]``;
    ``pattern``: ``[batch head dest_pos src_pos]``.
    """

    layer: Optional[int]
    kind: str
    head: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CircuitKDError(f"unknown site kind {self.kind!r}; expected one of {KINDS}")
        if self.kind in _LAYERLESS:
            if self.layer is not None:
                raise CircuitKDError(f"site kind {self.kind!r} takes no layer, got layer={self.layer}")
        elif self.layer is None:
            raise CircuitKDError(f"site kind {self.kind!r} needs a layer")
        if self.head is not None and self.kind not in HEAD_KINDS:
            raise CircuitKDError(f"site kind {self.kind!r} has no heads, got head={self.head}")

    @property
    def per_head(self) -> bool:
        return self.kind in HEAD_KINDS

    def __str__(self) -> str:
        head = f".h{self.head}" if self.head is not None else ""
        layer = "" if self.layer is None else f"{self.layer}."
        return f"{layer}{self.kind}{head}"


# ---------------------------------------------------------------------------- model facts

def backbone_of(model) -> str:
    """"native", "bert" or "vit": from the circuitkd spec when the model carries one, else the bridge config."""
    spec = getattr(model, "circuitkd_spec", None)
    if spec is not None:
        return spec.backbone
    arch = str(getattr(getattr(model, "cfg", None), "architecture", "") or "")
    if arch == "TransformerLensNative":
        return "native"
    if arch.startswith("Bert"):
        return "bert"
    if arch.startswith("ViT"):
        return "vit"
    if arch.startswith("GPT2"):
        # HF GPT-2 bridges (pre-LN, causal): supported for cross-checks against TransformerLens' own tools.
        return "gpt2"
    raise CircuitKDError(
        f"cannot tell the backbone of {type(model).__name__} (architecture {arch!r}); "
        "circuitkd supports native encoders, BERT and ViT bridges"
    )


def n_layers(model) -> int:
    return int(model.cfg.n_layers)


def n_heads(model) -> int:
    return int(model.cfg.n_heads)


def is_causal(model) -> bool:
    backbone = backbone_of(model)
    return backbone == "gpt2" or (backbone == "native" and getattr(model.cfg, "attention_dir", "") == "causal")


def has_mlp(model) -> bool:
    return not bool(getattr(model.cfg, "attn_only", False))


def check_site(model, site: Site) -> Site:
    """Raise :class:`CircuitKDError` naming the site if this model's backbone does not have it."""
    L, H = n_layers(model), n_heads(model)
    if site.layer is not None and not 0 <= site.layer < L:
        raise CircuitKDError(f"site {site}: layer {site.layer} out of range; the model has {L} layers")
    if site.head is not None and not 0 <= site.head < H:
        raise CircuitKDError(f"site {site}: head index {site.head} out of range; the model has {H} heads per layer")
    if site.kind == "mlp_out" and not has_mlp(model):
        raise CircuitKDError(f"site {site}: this attention-only model has no MLP")
    if site.kind == "final" and backbone_of(model) == "bert":
        raise CircuitKDError(f"site {site}: use Site({L - 1}, 'resid_post') for BERT (no final norm)")
    return site


def _block(layer: int) -> str:
    return f"blocks.{layer}"


def hook_name(model, site: Site) -> str:
    """The bridge hook name at which ``site`` is read or edited.

    ``head_out`` maps to ``attn.hook_z`` (see :func:`head_output`). ``pattern`` on
    BERT/ViT raises: HF attention has no pattern hook (read it with :func:`capture`,
    which computes it from q and k).
    """
    check_site(model, site)
    backbone = backbone_of(model)
    b = None if site.layer is None else _block(site.layer)
    k = site.kind
    if k == "embed":
        return "blocks.0.hook_resid_pre"
    if k == "final":
        return f"{_block(n_layers(model) - 1)}.hook_resid_post"
    if k == "resid_pre":
        return f"{b}.hook_resid_pre"
    if k == "resid_mid":
        # BERT's hook_resid_mid aliases ln2.hook_in (pre-LN sum); the residual the MLP reads is ln1's output.
        return f"{b}.ln1.hook_out" if backbone == "bert" else f"{b}.hook_resid_mid"
    if k == "resid_post":
        return f"{b}.hook_resid_post"
    if k == "attn_out":
        return f"{b}.attn.o.hook_out"
    if k == "mlp_out":
        return f"{b}.mlp.out.hook_out"
    if k in ("z", "head_out"):
        return f"{b}.attn.hook_z"
    if k in ("q", "k", "v"):
        return f"{b}.attn.hook_{k}"
    if k == "pattern":
        if backbone != "native":
            raise CircuitKDError(
                f"site {site}: the {backbone} backbone's HF attention has no editable attention pattern "
                "(hook_pattern is ignored); pattern sites can be patched only on native models"
            )
        return f"{b}.attn.hook_pattern"
    raise CircuitKDError(f"no hook for site {site}")  # pragma: no cover - KINDS is exhaustive


def edit_point(model, site: Site) -> tuple[str, bool]:
    """``(hook_name, additive)``: where to *edit* ``site``, and whether the edit must be a delta.

    Reading and editing differ at one site: on pre-LN bridges (native, ViT)
    ``hook_resid_mid`` is ``ln2.hook_in``, so replacing it changes only the MLP's input
    while the residual keeps the unpatched value. There the edit is made additively at the
    attention's write ``attn.o.hook_out`` (``resid_mid = resid_pre + attn_out``). Per-head
    outputs are edited additively there too (their own hook is ``z``). Everything else is
    edited in place at :func:`hook_name`.
    """
    if site.kind == "resid_mid" and backbone_of(model) != "bert":
        check_site(model, site)
        return hook_name(model, Site(site.layer, "attn_out")), True
    if site.kind == "head_out":
        return hook_name(model, Site(site.layer, "attn_out")), True
    return hook_name(model, site), False


def hook_point(model, name: str):
    """The HookPoint called ``name``; raises CircuitKDError naming it when the bridge has none."""
    try:
        return model.hook_dict[name]
    except KeyError:
        raise CircuitKDError(f"the model has no hook {name!r}") from None


def W_O(model, layer: int) -> Float[Tensor, "head d_head d_model"]:
    return model.blocks[layer].attn.W_O


def b_O(model, layer: int) -> Float[Tensor, " d_model"]:
    return model.blocks[layer].attn.b_O


def head_output(model, layer: int, z: Float[Tensor, "batch pos head d_head"]) -> Float[Tensor, "batch pos head d_model"]:
    """Each head's write into the residual stream, ``einsum(z, W_O[layer])``, without ``b_O``.

    ``head_output(...).sum(2) + b_O(model, layer)`` equals the attention output.
    """
    W = W_O(model, layer)
    if torch.is_inference(z):  # an inference-mode capture used later: no graph to build
        W = W.detach()
    return torch.einsum("bphd,hdm->bphm", z, W)


def attn_scale(model) -> float:
    """The divisor of q·k (sqrt(d_head) unless the config sets ``attn_scale``)."""
    cfg = model.cfg
    if backbone_of(model) == "native" and getattr(cfg, "use_attn_scale", True) and getattr(cfg, "attn_scale", -1) > 0:
        return float(cfg.attn_scale)
    return math.sqrt(cfg.d_head)


def pattern_from_qk(
    model,
    q: Float[Tensor, "batch pos head d_head"],
    k: Float[Tensor, "batch pos head d_head"],
    attention_mask: Optional[Tensor] = None,
) -> Float[Tensor, "batch head dest_pos src_pos"]:
    """Attention pattern from queries and keys, the padding mask and (for causal models) the causal mask.

    Matches what HF BERT/ViT attention computes internally (they expose no pattern hook).
    """
    from circuitkd.native import blocked_mask, masked_softmax

    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / attn_scale(model)
    return masked_softmax(scores, blocked_mask(attention_mask, q.shape[1], is_causal(model), q.device))


# ---------------------------------------------------------------------------- scoped hooks

@contextmanager
def edit_hooks(
    model,
    fwd: Sequence[tuple[str, HookFn]] = (),
    bwd: Sequence[tuple[str, HookFn]] = (),
) -> Iterator[None]:
    """Attach ``(hook_name, fn)`` forward and backward hooks for the duration of the block.

    ``fn(tensor, *, hook)`` returns a replacement tensor or None. Exactly the hooks added
    here are removed in ``finally``, also after an exception; other hooks stay.
    """
    added = []
    try:
        for direction, hooks in (("fwd", fwd), ("bwd", bwd)):
            for name, fn in hooks:
                hp = hook_point(model, name)
                added.append((hp, direction, hp.add_hook(fn, dir=direction)))
        yield
    finally:
        for hp, direction, handle in reversed(added):
            handle.hook.remove()
            handles = hp.fwd_hooks if direction == "fwd" else hp.bwd_hooks
            if handle in handles:
                handles.remove(handle)


def capture_hooks(
    model,
    sites: Iterable[Site],
    store: dict,
    *,
    attention_mask: Optional[Tensor] = None,
    grad: bool = False,
    transform: Optional[Callable[[Site, Tensor], Optional[Tensor]]] = None,
) -> list[tuple[str, HookFn]]:
    """Forward hooks that write each site's activation into ``store[site]``.

    With ``grad=False`` tensors are detached; with ``grad=True`` they stay in the graph and
    ``retain_grad()`` is called so ``store[site].grad`` is filled by a backward pass
    (derived sites — ``head_out``, HF ``pattern`` — are computed beside the graph and get no grad).
    ``transform(site, act)`` (optional) maps the activation before storing (a streaming
    reducer uses this); returning None stores nothing.
    """
    hooks: list[tuple[str, HookFn]] = []
    backbone = backbone_of(model)
    pending_q: dict[int, Tensor] = {}

    def put(site: Site, act: Tensor) -> Optional[Tensor]:
        # With grad, the hook hands the very tensor it stored back to the bridge, so that the
        # tensor downstream computation uses (after any reshaping hook conversion) is the stored one.
        passed = act
        if grad:
            if act.requires_grad and not act.is_leaf:
                act.retain_grad()
        else:
            act = act.detach()
            passed = None
        if transform is not None:
            act = transform(site, act)
            if act is None:
                return passed
        store[site] = act
        return passed

    for site in sites:
        check_site(model, site)
        site = Site(site.layer, site.kind)  # captures always hold every head
        if site.kind == "pattern" and backbone != "native":
            layer = site.layer

            def keep_q(act, *, hook, layer=layer):
                pending_q[layer] = act

            def make_pattern(act, *, hook, layer=layer, site=site):
                put(site, pattern_from_qk(model, pending_q.pop(layer), act, attention_mask))

            hooks.append((hook_name(model, Site(layer, "q")), keep_q))
            hooks.append((hook_name(model, Site(layer, "k")), make_pattern))
        elif site.kind == "head_out":
            def store_head_out(act, *, hook, site=site):
                put(site, head_output(model, site.layer, act))

            hooks.append((hook_name(model, site), store_head_out))
        else:
            def store_act(act, *, hook, site=site):
                return put(site, act)

            hooks.append((hook_name(model, site), store_act))
    return hooks


@contextmanager
def capture(
    model,
    sites: Iterable[Site],
    *,
    attention_mask: Optional[Tensor] = None,
    grad: bool = False,
) -> Iterator[dict]:
    """Collect the activations at ``sites`` during the forward passes run inside the block.

    Yields a dict ``Site -> Tensor`` (keys without ``head``; every head is kept). Each
    forward overwrites the previous one's entries; for batching and streaming reductions
    use :func:`circuitkd.engine.run`. Hooks are removed in ``finally``.
    """
    store: dict = {}
    with edit_hooks(model, capture_hooks(model, sites, store, attention_mask=attention_mask, grad=grad)):
        yield store


def all_sites(model, kinds: Sequence[str]) -> list[Site]:
    """Every ``Site(layer, kind)`` of this model for the given kinds, layer by layer."""
    out = []
    for layer in range(n_layers(model)):
        for kind in kinds:
            if kind in _LAYERLESS:
                continue
            if kind == "mlp_out" and not has_mlp(model):
                continue
            out.append(Site(layer, kind))
    return out


# ---------------------------------------------------------------------------- circuit-edge hooks

def mlp_input_hook_name(model, layer: int) -> str:
    """The MLP's own input (after ``ln2`` on pre-LN models; the normalised residual on BERT)."""
    check_site(model, Site(layer, "mlp_out"))
    return f"{_block(layer)}.mlp.hook_in"


def readout_hook_name(model) -> str:
    """The classifier's (or unembedding's) input over every position.

    Pre-LN models: ``ln_final``'s output; BERT (no final norm): the pooler's input,
    i.e. the last block's normalised residual.
    """
    return "pooler.hook_in" if backbone_of(model) == "bert" else "ln_final.hook_out"


def norm_hook_names(model, layer: Optional[int], norm: str) -> tuple[str, str]:
    """``(input, output)`` hooks of a LayerNorm: ``norm`` is "ln1", "ln2" (``layer`` set) or "ln_final".

    On BERT ``ln1`` is the post-attention norm and ``ln2`` the post-MLP norm (both on
    the residual stream); on pre-LN models they are the attention's and the MLP's input norms.
    """
    if norm == "ln_final":
        if backbone_of(model) == "bert":
            raise CircuitKDError("BERT has no final norm (its blocks end in ln2)")
        prefix = "ln_final"
    elif norm in ("ln1", "ln2"):
        if layer is None or not 0 <= layer < n_layers(model):
            raise CircuitKDError(f"norm {norm!r} needs a layer in [0, {n_layers(model)}), got {layer}")
        prefix = f"{_block(layer)}.{norm}"
    else:
        raise CircuitKDError(f"unknown norm {norm!r}; expected 'ln1', 'ln2' or 'ln_final'")
    return f"{prefix}.hook_in", f"{prefix}.hook_out"


def norm_module(model, layer: Optional[int], norm: str) -> torch.nn.Module:
    """The ``torch.nn.LayerNorm`` behind a bridge norm (for recomputing it on edited inputs)."""
    norm_hook_names(model, layer, norm)  # validates the name
    bridge = model.ln_final if norm == "ln_final" else getattr(model.blocks[layer], norm)
    return getattr(bridge, "_original_component", bridge)
