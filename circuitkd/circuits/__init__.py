"""Circuit discovery on teacher and student bridges: one graph type, one Circuit type, one
signature for every method, and a registry (the auto-circuit layout).

Methods (``discover(model, pairs, method=...)``):

- ``"exact"``: edge patching, one edge at a time, many edges per batched forward;
- ``"eap"``: edge attribution patching (Syed et al. 2023);
- ``"eap-ig"``: EAP with integrated gradients over input interpolations (Hanna et al. 2024; MIB's
  ``EAP-IG-inputs``);
- ``"eap-ig-activations"``: integrated gradients over each node group's activations, one group at a
  time (MIB's ``EAP-IG-activations``, Mueller et al. 2025);
- ``"clean-corrupted"``: the gradient averaged over the clean and the corrupt run only (MIB's
  ``clean-corrupted``);
- ``"mask-gradient-ig"``: integrated gradients of the metric with respect to edge masks interpolated
  from 0 to 1 together (auto-circuit's ``mask_gradient_prune_scores``);
- ``"acdc"``: automatic circuit discovery with a KL or metric threshold (Conmy et al. 2023).

Every method is ``f(model, pairs, *, metric, graph, ablation, batch_size, **options) -> Circuit``.
Faithfulness curves and their areas (CPR, CMD) follow MIB (Mueller et al. 2025).
"""
from __future__ import annotations

import inspect
import warnings
from typing import Callable, Optional

import torch

from circuitkd.circuits.acdc import acdc, acdc_sweep
from circuitkd.circuits.base import ABLATIONS
from circuitkd.circuits.clean_corrupted import clean_corrupted
from circuitkd.circuits.compare import CircuitComparison, compare_circuits
from circuitkd.circuits.eap import eap
from circuitkd.circuits.eap_ig import eap_ig
from circuitkd.circuits.eap_ig_activations import eap_ig_activations
from circuitkd.circuits.exact import exact
from circuitkd.circuits.faithfulness import MIB_FRACTIONS, FaithfulnessResult, faithfulness
from circuitkd.circuits.forward import patched_forward, source_values
from circuitkd.circuits.graph import Circuit, ComponentGraph
from circuitkd.circuits.mask_gradient import mask_gradient_ig
from circuitkd.circuits.paths import hooked_only
from circuitkd.circuits import postln
from circuitkd.circuits.postln import validate_post_ln
from circuitkd.engine import check_pairs
from circuitkd.errors import CircuitKDError
from circuitkd.metrics import logit_diff, metric_name, resolve_metric
from circuitkd.types import PromptPairs

#: name -> method; every method has the signature above.
METHODS: dict[str, Callable[..., Circuit]] = {
    "exact": exact, "eap": eap, "eap-ig": eap_ig, "eap-ig-activations": eap_ig_activations,
    "clean-corrupted": clean_corrupted, "mask-gradient-ig": mask_gradient_ig, "acdc": acdc,
}
_GRADIENT_METHODS = ("eap", "eap-ig", "eap-ig-activations", "clean-corrupted", "mask-gradient-ig")


def register(name: str, fn: Callable[..., Circuit]) -> None:
    """Add a circuit method under ``name`` (same signature as the built-in ones)."""
    METHODS[name] = fn


def build_graph(model, pairs: Optional[PromptPairs] = None, *, per_position: bool = False,
                level: str = "edge") -> ComponentGraph:
    """The model's :class:`ComponentGraph` (per-position graphs take their length from ``pairs``)."""
    n_pos = None
    if per_position:
        if pairs is None:
            raise CircuitKDError("a per-position graph needs pairs to read the input length from")
        probe = ComponentGraph.from_model(model)
        n_pos = int(source_values(model, probe, pairs.clean[:1].to(next(model.parameters()).device),
                                  None if pairs.attention_mask is None else pairs.attention_mask[:1]
                                  .to(next(model.parameters()).device)).outputs.shape[1])
    return ComponentGraph.from_model(model, per_position=per_position, n_pos=n_pos, level=level)


def _check_options(method: str, options: dict) -> None:
    """Refuse keywords that ``method`` does not take (a TypeError deep inside otherwise)."""
    params = inspect.signature(METHODS[method]).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"metric", "graph", "ablation",
                                                                           "batch_size"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise CircuitKDError(f"discover(method={method!r}) got unknown keyword(s) {unknown}; "
                             f"{method} takes {sorted(accepted)}")


def discover(model, pairs: PromptPairs, method: str = "eap-ig", metric=None, *, ablation: str = "corrupt",
             per_position: bool = False, level: str = "edge", batch_size: int = 32,
             top_k: Optional[int] = None, threshold: Optional[float] = None,
             check_post_ln: bool = True, post_ln_tolerance: float = 0.25, **options) -> Circuit:
    """Find a circuit in ``model`` for the behaviour ``pairs`` contrast.

    ``metric``: a name from :data:`circuitkd.metrics.METRICS` or ``metric(logits, pairs, clean_logits=None) -> Float[batch]``;
    the default is the logit difference between ``pairs.clean_answer`` and ``pairs.corrupt_answer``
    (gold vs the shortcut's label on :meth:`Task.shortcut_pairs`). ``top_k`` / ``threshold`` set the
    circuit's mask from the scores (ACDC sets its own). On a post-LN model (BERT) edges use
    frozen norm scales; with ``check_post_ln`` the definition is checked against real
    patching first, and where it fails the circuit falls back to node level (with a warning
    and ``circuit.info["note"]``).
    """
    if method not in METHODS:
        raise CircuitKDError(f"unknown circuit method {method!r}; known methods: {sorted(METHODS)}")
    if ablation not in ABLATIONS:
        raise CircuitKDError(f"unknown ablation {ablation!r}; expected one of {ABLATIONS}")
    _check_options(method, options)
    check_pairs(model, pairs)
    metric = resolve_metric(metric, pairs)
    note = None
    graph = build_graph(model, pairs, per_position=per_position, level=level)
    if graph.post_ln and level == "edge" and check_post_ln:
        report = validate_post_ln(model, pairs, metric=metric, ablation=ablation, batch_size=batch_size,
                                  tolerance=post_ln_tolerance)
        if not report["ok"]:
            note = (f"post-LN edges (frozen norm scales) disagree with real patching on these pairs "
                    f"(relative error {report['relative_error']:.2f} > {report['tolerance']}): "
                    "falling back to a node-level circuit")
            warnings.warn(note, stacklevel=2)
            graph = build_graph(model, pairs, per_position=per_position, level="node")
    if graph.level == "node" and method in _GRADIENT_METHODS:
        note = (note + "; " if note else "") + f"{method} scores edges only: node level uses exact patching"
        method = "exact"
        options = {k: v for k, v in options.items() if k in ("edges_per_forward",)}
    circuit = METHODS[method](model, pairs, metric=metric, graph=graph, ablation=ablation,
                              batch_size=batch_size, **options)
    if not bool(torch.isfinite(circuit.scores).all()):
        raise CircuitKDError(f"{method} scores hold non-finite values (NaN or inf) for metric "
                             f"{metric_name(metric)!r}: no circuit can be selected from them")
    if top_k is not None:
        circuit = circuit.top_k(top_k)
    elif threshold is not None:
        circuit = circuit.threshold(threshold)
    circuit.info["metric"] = getattr(metric, "__name__", type(metric).__name__)
    if note:
        circuit.info["note"] = note
    return circuit


__all__ = [
    "ComponentGraph", "Circuit", "METHODS", "register", "discover", "build_graph", "exact", "eap", "eap_ig",
    "eap_ig_activations", "clean_corrupted", "mask_gradient_ig",
    "acdc", "acdc_sweep", "faithfulness", "FaithfulnessResult", "MIB_FRACTIONS", "validate_post_ln", "patched_forward",
    "source_values", "logit_diff", "compare_circuits", "CircuitComparison", "hooked_only",
]
