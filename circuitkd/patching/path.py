"""Path patching (Wang et al. 2022, "Interpretability in the Wild"): a sender head's effect
through chosen receivers only."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.engine import check_pairs, forward, model_device, pair_batches
from circuitkd.errors import CircuitKDError
from circuitkd.hooks import Site, edit_hooks, has_mlp, hook_name, n_heads, n_layers
from circuitkd.metrics import MetricArg, evaluate_metric, read_positions, readout, resolve_metric
from circuitkd.patching.hooked import capture_batch, stack_rows
from circuitkd.patching.sites import direction_inputs, n_positions, normalise_effect
from circuitkd.types import Direction, PromptPairs


def path_patch(
    model,
    pairs: PromptPairs,
    receivers: Any = "logits",
    metric: MetricArg = None,
    *,
    senders: Optional[Sequence[tuple[int, int]]] = None,
    direction: Direction | str = Direction.DENOISE,
    normalise: bool = True,
    batch_size: int = 64,
    freeze_mlps: bool = True,
) -> Float[Tensor, "layer head"]:
    """Path patching (Wang et al. 2022): each sender head's effect through the receivers only.

    Args:
        receivers: ``"logits"`` (the direct path to the classifier read-out) or a list of
            ``(layer, head, port)`` with port in ``"q" "k" "v"``.
        senders: ``(layer, head)`` heads to test (default: every head in a layer below the lowest receiver).

    Pass 1 runs the base input with every head's ``z`` (and, with ``freeze_mlps``, every
    MLP output) frozen to the base run except the sender's, taken from the source run, and
    records the receivers' q/k/v (or the read-out logits). Pass 2 runs the base input with
    only the receivers' q/k/v replaced by the recorded values. Senders ride in the batch
    dimension. Returns ``Float[layer head]`` with NaN for heads that are not senders.
    """
    check_pairs(model, pairs)
    direction = Direction.parse(direction)
    metric_fn = resolve_metric(metric, pairs)
    L, H = n_layers(model), n_heads(model)
    to_logits = isinstance(receivers, str)
    if to_logits and receivers != "logits":
        raise CircuitKDError(f"receivers must be 'logits' or a list of (layer, head, port), got {receivers!r}")
    recv: list[tuple[int, int, str]] = []
    if not to_logits:
        for r in receivers:
            if len(r) != 3 or r[2] not in ("q", "k", "v"):
                raise CircuitKDError(f"receiver {r!r} must be (layer, head, port) with port q, k or v")
            layer, head, port = int(r[0]), int(r[1]), r[2]
            hook_name(model, Site(layer, port, head))  # validates layer and head
            recv.append((layer, head, port))
        if not recv:
            raise CircuitKDError("path patching needs at least one receiver")
    top = L if to_logits else min(r[0] for r in recv)
    if senders is None:
        senders = [(layer, h) for layer in range(top) for h in range(H)]
    for s in senders:
        hook_name(model, Site(int(s[0]), "z", int(s[1])))
        if s[0] >= top:
            raise CircuitKDError(f"sender {tuple(s)} is not below the receivers (lowest receiver layer {top})")
    device = model_device(model)
    P = n_positions(model, pairs)
    S = len(senders)
    total = torch.zeros(S, dtype=torch.float64)
    m_base_sum = m_src_sum = 0.0
    z_sites = [Site(i, "z") for i in range(L)]
    mlp_sites = [Site(i, "mlp_out") for i in range(L)] if (freeze_mlps and has_mlp(model)) else []
    for sub in pair_batches(pairs, batch_size, device):
        base_in, src_in = direction_inputs(sub, direction)
        mask = sub.attention_mask
        B = len(sub)
        r = read_positions(sub, P, device)
        base_out, base_store = capture_batch(model, base_in, mask, z_sites + mlp_sites)
        src_out, src_store = capture_batch(model, src_in, mask, z_sites)
        base_logits, src_logits = readout(base_out, r), readout(src_out, r)
        clean_logits = src_logits if direction is Direction.DENOISE else base_logits
        m_base_sum += float(evaluate_metric(metric_fn, base_logits, sub, clean_logits).sum())
        m_src_sum += float(evaluate_metric(metric_fn, src_logits, sub, clean_logits).sum())
        n_chunk = max(1, stack_rows(device) // B)
        for start in range(0, S, n_chunk):
            chunk = senders[start:start + n_chunk]
            N = len(chunk)
            rep_in = base_in.repeat((N,) + (1,) * (base_in.dim() - 1))
            rep_mask = None if mask is None else mask.repeat(N, 1)

            def freeze_z(act, *, hook, layer):
                act = base_store[Site(layer, "z")].repeat(N, 1, 1, 1)
                view = act.view((N, B) + tuple(act.shape[1:]))
                for n, (sl, sh) in enumerate(chunk):
                    if sl == layer:
                        view[n, :, :, sh] = src_store[Site(layer, "z")][:, :, sh]
                return act

            def freeze_mlp(act, *, hook, layer):
                return base_store[Site(layer, "mlp_out")].repeat(N, 1, 1)

            recorded: dict = {}

            def record(act, *, hook, key):
                recorded[key] = act.detach().clone()

            hooks1 = [(hook_name(model, s), _bind(freeze_z, layer=s.layer)) for s in z_sites]
            hooks1 += [(hook_name(model, s), _bind(freeze_mlp, layer=s.layer)) for s in mlp_sites]
            ports = sorted({(layer, port) for layer, _, port in recv})
            hooks1 += [(hook_name(model, Site(layer, port)), _bind(record, key=(layer, port))) for layer, port in ports]
            with torch.inference_mode(), edit_hooks(model, hooks1):
                out1 = forward(model, rep_in, rep_mask)
            if to_logits:
                logits = readout(out1, r.repeat(N))
            else:
                def patch_port(act, *, hook, layer, port):
                    act = act.clone()
                    for rl, rh, rp in recv:
                        if rl == layer and rp == port:
                            act[:, :, rh] = recorded[(layer, port)][:, :, rh]
                    return act

                hooks2 = [(hook_name(model, Site(layer, port)), _bind(patch_port, layer=layer, port=port))
                          for layer, port in ports]
                with torch.inference_mode(), edit_hooks(model, hooks2):
                    logits = readout(forward(model, rep_in, rep_mask), r.repeat(N))
            vals = evaluate_metric(metric_fn, logits, sub.repeat(N), clean_logits.repeat(N, 1))
            total[start:start + N] += vals.view(N, B).sum(1).cpu()
    n = len(pairs)
    raw = total / n
    m_base, m_src = m_base_sum / n, m_src_sum / n
    m_clean, m_corrupt = (m_src, m_base) if direction is Direction.DENOISE else (m_base, m_src)
    vals = normalise_effect(raw, m_clean, m_corrupt) if normalise else raw
    out = torch.full((L, H), float("nan"), dtype=torch.float32)
    for (sl, sh), v in zip(senders, vals.tolist()):
        out[int(sl), int(sh)] = v
    return out


def _bind(fn, **kw):
    def hook(act, *, hook):
        return fn(act, hook=hook, **kw)
    return hook
