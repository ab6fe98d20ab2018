"""EAP-IG over intermediate activations, ``EAP-IG-activations`` of MIB's circuit track (Mueller et al. 2025;
the integrated gradients of Sundararajan et al. 2017 taken at internal activations as in Marks et al. 2024).

Where EAP-IG (:mod:`circuitkd.circuits.eap_ig`) interpolates the input embedding, this method
interpolates the output of one *node group* at a time, the other components running on the
clean input. The groups are those of MIB's reference (``get_scores_ig_activations`` in the EAP-IG
library): the input embedding, all heads of one attention layer together, one MLP. For group
``n`` and step ``k = 1..steps`` (``alpha = k / steps``) the group's output is *replaced* by the
constant ``alpha * clean_n + (1 - alpha) * replacement_n`` (so no gradient passes through the
group's own inputs on that run) and the gradient of the metric at every reader's input is taken.
Every edge's score contracts the average of those gradients over all groups and steps with its
source's difference, as in EAP::

    score(src -> dst) = mean_pairs sum_pos (replacement_src - clean_src)
                        . 1 / (G * steps) sum_{n = 1..G} sum_{k = 1..steps} g_dst(n, k / steps)

``G`` = 1 + n_layers (+ n_layers with MLPs); ``g_dst(n, alpha)`` = d metric / d (input of
``dst``) on that run. This equals MIB's computation for corrupt-activation and zero ablation. For
mean ablation MIB's code leaves the corrupt activations at zero, so it interpolates towards zero
while contracting with ``mean - clean``; here the path ends at the replacement the difference uses.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from circuitkd import hooks
from circuitkd.circuits.base import BatchValues, batches
from circuitkd.circuits.eap import scores_from_gradients
from circuitkd.circuits import native_gradients
from circuitkd.circuits.gradients import (add_gradients, check_edge_graph, check_steps, hooked_reader_gradients,
                                          source_deltas)
from circuitkd.circuits.graph import Circuit, ComponentGraph
from circuitkd.hooks import Site
from circuitkd.metrics import Metric
from circuitkd.types import PromptPairs


def node_groups(graph: ComponentGraph) -> list[tuple[str, Optional[int]]]:
    """The groups interpolated one at a time: ``("embed", None)``, then per layer ``("head", l)`` and ``("mlp", l)``."""
    out: list[tuple[str, Optional[int]]] = [("embed", None)]
    for layer in range(graph.n_layers):
        out.append(("head", layer))
        if graph.has_mlp:
            out.append(("mlp", layer))
    return out


def _group_difference(graph: ComponentGraph, bv: BatchValues, group) -> Tensor:
    """``[batch pos d_model]``: ``replacement - clean`` of the group's summed output (what its hook point carries)."""
    kind, layer = group
    sl = graph.source_slice(kind, layer)
    rep = bv.replacement[:, :, sl].to(bv.clean.outputs.dtype)
    return (rep - bv.clean.outputs[:, :, sl]).sum(2)


def _override_hook(K: int, selected: Tensor, coef: Tensor, diff: Tensor):
    """Forward hook: in the selected copies the group's output becomes the constant
    ``clean + coef * (replacement - clean)`` (the run is clean up to it there, so ``act`` is the clean value)."""
    def fn(act, *, hook):
        a = act.view(K, -1, *act.shape[1:])
        const = a.detach() + coef.view(K, 1, 1, 1).to(act.dtype) * diff[None].to(act.dtype)
        return torch.where(selected.view(K, 1, 1, 1), const, a).reshape(act.shape)
    return fn


def _hooked_gradient_sum(model, graph: ComponentGraph, bv: BatchValues, metric: Metric, diffs: dict,
                         runs: list, per: int) -> dict:
    """Reader gradients summed over every (group, alpha) run, ``per`` runs per forward, the groups'
    outputs replaced by forward hooks."""
    B = len(bv.pairs)
    clean_emb = bv.clean.outputs[:, :, 0]
    grad_sum: dict = {}
    for start in range(0, len(runs), per):
        chunk = runs[start:start + per]
        K = len(chunk)
        fwd = []
        emb_coef = torch.tensor([1 - a if g == ("embed", None) else 0.0 for g, a in chunk],
                                dtype=clean_emb.dtype, device=clean_emb.device)
        emb = clean_emb[None] + emb_coef.view(K, 1, 1, 1) * diffs[("embed", None)][None]
        for group in {g for g, _ in chunk if g[0] != "embed"}:
            kind, layer = group
            selected = torch.tensor([g == group for g, _ in chunk], device=clean_emb.device)
            coef = torch.tensor([1 - a for _, a in chunk], dtype=clean_emb.dtype, device=clean_emb.device)
            site = Site(layer, "attn_out" if kind == "head" else "mlp_out")
            fwd.append((hooks.hook_name(model, site), _override_hook(K, selected, coef, diffs[group])))
        with hooks.edit_hooks(model, fwd):
            grads = hooked_reader_gradients(model, graph, bv, metric, bv.pairs.clean, n_copies=K,
                                            norm_scales=bv.clean.norm_scales,
                                            embed_override=emb.reshape(K * B, *emb.shape[2:]))
        grad_sum = add_gradients(grad_sum, grads)
    return grad_sum


def _native_gradient_sum(model, graph: ComponentGraph, bv: BatchValues, metric: Metric, diffs: dict, steps: int,
                         steps_per_forward: Optional[int]) -> dict:
    """The same sum without hooks (:mod:`circuitkd.circuits.native_gradients`), one group per forward: the
    copies of a layer's group share the clean run below that layer, computed once."""
    B, P = bv.pairs.clean.shape
    per = native_gradients.copies_per_forward(B, P, steps_per_forward, steps)
    clean_emb = bv.clean.outputs[:, :, 0]
    alphas = torch.arange(1, steps + 1, dtype=clean_emb.dtype, device=clean_emb.device) / steps
    grad_sum: dict = {}
    for group in node_groups(graph):
        kind, layer = group
        for start in range(0, steps, per):
            coef = 1 - alphas[start:start + per]
            K = len(coef)
            if kind == "embed":
                emb = clean_emb[None] + coef.view(K, 1, 1, 1) * diffs[group][None]
                grads = native_gradients.reader_gradients(model, graph, bv, metric, bv.pairs.clean, n_copies=K,
                                                          embed=emb.reshape(K * B, *emb.shape[2:]))
            else:
                override = native_gradients.Override(kind, layer, coef, diffs[group])
                grads = native_gradients.reader_gradients(model, graph, bv, metric, bv.pairs.clean, n_copies=K,
                                                          override=override)
            grad_sum = add_gradients(grad_sum, grads)
    return grad_sum


def eap_ig_activations(model, pairs: PromptPairs, *, metric: Metric, graph: ComponentGraph, ablation: str = "corrupt",
                       batch_size: int = 32, steps: int = 5, steps_per_forward: Optional[int] = None,
                       mean_values: Optional[torch.Tensor] = None) -> Circuit:
    """EAP-IG-activations edge scores ``[source reader]`` (``[pos source reader]`` per position).

    ``steps`` interpolation steps per node group (``G * steps`` forward + backward passes per batch in
    all); ``steps_per_forward`` of them ride in the batch dimension of one forward (default ``steps`` on
    the hooked path; as many of one group as fit
    :data:`~circuitkd.circuits.native_gradients.TOKENS_PER_FORWARD` on native pre-LN models, hook-free).
    """
    check_steps(steps)
    if steps_per_forward is not None:
        check_steps(steps_per_forward, name="steps_per_forward")
    check_edge_graph(graph, "eap-ig-activations")
    runs = [(group, k / steps) for group in node_groups(graph) for k in range(1, steps + 1)]
    total, n = None, 0
    for bv in batches(model, graph, pairs, batch_size=batch_size, ablation=ablation, mean_values=mean_values):
        B = len(bv.pairs)
        deltas = source_deltas(model, graph, bv)
        diffs = {group: _group_difference(graph, bv, group) for group in node_groups(graph)}
        if native_gradients.supported(model, graph, bv.pairs.clean):
            grad_sum = _native_gradient_sum(model, graph, bv, metric, diffs, steps, steps_per_forward)
        else:
            grad_sum = _hooked_gradient_sum(model, graph, bv, metric, diffs, runs, steps_per_forward or steps)
        s = scores_from_gradients(graph, deltas, {k: v / len(runs) for k, v in grad_sum.items()})
        total = s if total is None else total + s
        n += B
    return Circuit(graph, (total / n).float(), method="eap-ig-activations",
                   info={"ablation": ablation, "steps": steps, "n_pairs": n, "groups": len(node_groups(graph))})
