"""The one readable forward of a TL-native encoder, on the bridge's own weights (nanoGPT style).

A TransformerLens bridge runs every activation through hook points; for training and for
plain class read-outs nothing needs them, and on a small CPU model their overhead is most of
a step. :func:`class_logits_native` computes the same logits (to 1e-5) top to bottom:
embed -> [LN -> attention -> LN -> MLP] x L -> final LN -> unembed at the read position.
The parameters are the bridge's own ``original_component`` tensors, so gradients reach the
model being trained and nothing is copied.

:func:`attend` is where circuitkd computes native attention; the patching fast path and the
circuit edge runner call it too. :func:`patterns_native` runs the same forward and also returns
every layer's pattern with its gradients, what attention-transfer distillation trains on
(:mod:`circuitkd.train.attention_transfer`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

ACTIVATIONS = {
    "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
    "silu": F.silu, "swish": F.silu,
}


def supported(model) -> bool:
    """Whether this forward reproduces ``model``: a TL-native LN model with learned positions and a plain MLP."""
    if type(getattr(model, "original_model", None)).__name__ != "NativeModel":
        return False
    cfg = model.cfg
    return (
        str(cfg.normalization_type).upper() == "LN"
        and (cfg.positional_embedding_type or "standard") == "standard"
        and (cfg.n_key_value_heads in (None, cfg.n_heads))
        and float(cfg.attn_scores_soft_cap) <= 0
        and float(cfg.output_logits_soft_cap) <= 0
        and not cfg.gated_mlp
        and (cfg.act_fn or "gelu").lower() in ACTIVATIONS
        and not getattr(cfg, "final_rms", False)
    )


def attn_scale(model) -> float:
    cfg = model.cfg
    return float(cfg.attn_scale) if (cfg.use_attn_scale and cfg.attn_scale > 0) else math.sqrt(cfg.d_head)


def blocked_mask(mask: Optional[Tensor], n_pos: int, causal: bool, device) -> Tensor:
    """``Bool[batch|1, 1, dest_pos, src_pos]``: True where attention is not allowed."""
    blocked = torch.zeros(n_pos, n_pos, dtype=torch.bool, device=device)
    if causal:
        blocked = torch.triu(torch.ones(n_pos, n_pos, dtype=torch.bool, device=device), diagonal=1)
    blocked = blocked[None, None]
    if mask is not None:
        blocked = blocked | ~mask.bool()[:, None, None, :]
    return blocked


def attend(q: Float[Tensor, "... dest_pos head d_head"], k: Float[Tensor, "... src_pos head d_head"],
           v: Float[Tensor, "... src_pos head d_head"], blocked: Tensor, scale: float
           ) -> tuple[Float[Tensor, "... dest_pos head d_head"], Float[Tensor, "... head dest_pos src_pos"]]:
    """Softmax attention: ``(z, pattern)``. Rows with nothing to attend to get a zero pattern, as TL's."""
    pattern = masked_softmax(torch.einsum("...qhd,...khd->...hqk", q, k) / scale, blocked)
    return torch.einsum("...hqk,...khd->...qhd", pattern, v), pattern


def masked_softmax(scores: Float[Tensor, "... dest_pos src_pos"], blocked: Tensor) -> Float[Tensor, "... dest_pos src_pos"]:
    """The attention pattern from scaled scores: blocked keys get no weight, and a row with every key
    blocked (an all-padding input) is all zeros rather than NaN, as TransformerLens's attention."""
    pattern = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)
    if bool(blocked.all(-1).any()):
        pattern = pattern.masked_fill(blocked, 0.0)
    return pattern


def _orig(module):
    return module.original_component


def _forward(model, tokens: Tensor, attention_mask: Optional[Tensor], read_pos: Optional[Tensor],
             patterns: Optional[list]) -> tuple[Tensor, Tensor]:
    """``(logits, hidden)`` at the read positions; appends each layer's pattern to ``patterns`` when given."""
    cfg = model.cfg
    n_heads, d_head, d_model = int(cfg.n_heads), int(cfg.d_head), int(cfg.d_model)
    act = ACTIVATIONS[(cfg.act_fn or "gelu").lower()]
    scale = attn_scale(model)
    B, P = tokens.shape
    x = _orig(model.embed).weight[tokens] + _orig(model.pos_embed).weight[:P][None]
    blocked = blocked_mask(attention_mask, P, cfg.attention_dir == "causal", tokens.device)
    for blk in model.blocks:
        ln1 = _orig(blk.ln1)
        h = F.layer_norm(x, (d_model,), ln1.weight, ln1.bias, ln1.eps)
        q, k, v = (F.linear(h, _orig(lin).weight, _orig(lin).bias).unflatten(-1, (n_heads, d_head))
                   for lin in (blk.attn.q, blk.attn.k, blk.attn.v))
        z, pattern = attend(q, k, v, blocked, scale)
        if patterns is not None:
            patterns.append(pattern)
        o = _orig(blk.attn.o)
        x = x + F.linear(z.flatten(-2), o.weight, o.bias)
        if not cfg.attn_only:
            ln2, fc_in, fc_out = _orig(blk.ln2), _orig(getattr(blk.mlp, "in")), _orig(blk.mlp.out)
            h = F.layer_norm(x, (d_model,), ln2.weight, ln2.bias, ln2.eps)
            x = x + F.linear(act(F.linear(h, fc_in.weight, fc_in.bias)), fc_out.weight, fc_out.bias)
    if read_pos is None:
        hidden = x[:, 0]
    else:
        hidden = x[torch.arange(B, device=x.device), read_pos]
    lnf, unembed = _orig(model.ln_final), _orig(model.unembed)
    hidden = F.layer_norm(hidden, (d_model,), lnf.weight, lnf.bias, lnf.eps)
    return F.linear(hidden, unembed.weight, unembed.bias), hidden


def class_logits_native(model, tokens: Int[Tensor, "batch pos"], attention_mask: Optional[Tensor] = None,
                        read_pos: Optional[Int[Tensor, " batch"]] = None, *, return_hidden: bool = False):
    """Logits ``[batch, d_vocab_out]`` at ``read_pos`` (default 0, the CLS token) of a native bridge.

    With ``return_hidden`` also returns the classifier's input, the final residual stream at the
    read position after the final LayerNorm (``[batch, d_model]``), what learned-mixin's gate reads.
    """
    logits, hidden = _forward(model, tokens, attention_mask, read_pos, None)
    return (logits, hidden) if return_hidden else logits


def patterns_native(model, tokens: Int[Tensor, "batch pos"], attention_mask: Optional[Tensor] = None,
                    read_pos: Optional[Int[Tensor, " batch"]] = None
                    ) -> tuple[Float[Tensor, "batch d_vocab_out"], Float[Tensor, "batch layer head dest_pos src_pos"]]:
    """``(logits, patterns)`` of a native bridge from one forward, the patterns keeping their gradients.

    ``logits`` are :func:`class_logits_native`'s; ``patterns`` stacks every layer's attention
    pattern (rows of padded destinations attend over real sources; fully blocked rows are zero).
    What attention-transfer distillation trains on.
    """
    patterns: list[Tensor] = []
    logits, _ = _forward(model, tokens, attention_mask, read_pos, patterns)
    return logits, torch.stack(patterns, dim=1)
