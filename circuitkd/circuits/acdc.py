"""ACDC, automatic circuit discovery (Conmy et al. 2023), with batched candidate evaluation.

Readers are visited from the output back to the first layer; for each, its incoming edges
(latest source first) are tentatively removed from the current circuit, and a removal is
kept when it moves the criterion by less than ``threshold``: the KL divergence of the
circuit's read-out distribution from the full model's (``criterion="kl"``), or the drop of
the task metric (``criterion="metric"``). ACDC is sequential (each decision is taken on the
circuit left by the previous ones); we keep it exactly so while batching: one forward
evaluates the *prefixes* of the candidate list (remove the first, the first two, ...), all
accepted removals up to the first rejection are taken at once, and only after a rejection
are the remaining prefixes re-evaluated (the batch doubles while removals are accepted and
resets to one candidate after a rejection, which wastes no evaluation on a rejected prefix). ``candidates_per_forward=1`` is the plain,
one-removal-per-forward reference. Each edge's score is the criterion change measured
when it was tried. On native pre-LN models the candidates are evaluated by
:class:`~circuitkd.circuits.forward.NativeEdgeRunner` (the same edge-patched forward on the
weights, without hooks, from the first layer any candidate ablates an edge into); elsewhere by
the hooked :func:`~circuitkd.circuits.forward.patched_forward`.
"""
from __future__ import annotations

from typing import Optional

import torch

from circuitkd.circuits.base import batches
from circuitkd.circuits.forward import NativeEdgeRunner, native_edge_supported, patched_forward
from circuitkd.circuits.graph import Circuit, ComponentGraph
from circuitkd.circuits.paths import native_allowed
from circuitkd.errors import CircuitKDError
from circuitkd.metrics import KLToClean, Metric, evaluate_metric
from circuitkd.types import PromptPairs

CRITERIA = ("kl", "metric")

class _Logits:
    def __init__(self, logits):
        self.logits = logits


class _Evaluator:
    """Mean criterion over all pairs for a stack of keep-masks ``[K *graph.shape]``."""

    def __init__(self, model, graph, pairs, metric, criterion, ablation, batch_size, mean_values):
        self.model, self.graph = model, graph
        self.metric, self.criterion = metric, criterion
        self.batches = list(batches(model, graph, pairs, batch_size=batch_size, ablation=ablation,
                                    mean_values=mean_values))
        self.n = len(pairs)
        self.forwards = 0
        self.caches = None  # per batch: the native runner's start cache of the sweep's states (try_removal)
        # Native pre-LN models: run the masked forward on the weights directly, from the first layer
        # a copy ablates an edge into (same logits as patched_forward; see NativeEdgeRunner).
        self.runners = None
        if native_allowed() and native_edge_supported(model, graph) and not pairs.clean.is_floating_point():
            from circuitkd.metrics import read_positions, readout
            self.runners = [NativeEdgeRunner(model, graph, bv.pairs.clean, bv.pairs.attention_mask, bv.clean,
                                             bv.replacement) for bv in self.batches]
            # the runner computes only the read positions in the last layer: [batch] and the clean run there
            self.read_pos = [read_positions(bv.pairs, bv.pairs.clean.shape[1], bv.pairs.clean.device) for bv in self.batches]
            self.clean_read = [readout(bv.clean.logits, r) for bv, r in zip(self.batches, self.read_pos)]

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        K = keep.shape[0]
        total = torch.zeros(K, dtype=torch.float64)
        node_level = self.graph.level == "node"
        for i, bv in enumerate(self.batches):
            w = (~keep).float().to(bv.replacement.device)
            clean_logits = bv.clean.logits
            with torch.no_grad():
                if self.runners is not None:
                    run = _Logits(self.runners[i].logits(w, self.read_pos[i]))
                    clean_logits = self.clean_read[i]
                elif node_level:
                    run = patched_forward(self.model, self.graph, bv.pairs.clean, bv.pairs.attention_mask,
                                          node_ablate=w, replacement=bv.replacement)
                else:
                    run = patched_forward(self.model, self.graph, bv.pairs.clean, bv.pairs.attention_mask,
                                          ablate=w, replacement=bv.replacement, norm_scales=bv.clean.norm_scales)
            total += self._criterion(run.logits, bv, K, clean_logits)
            self.forwards += 1
        return total / self.n

    def _criterion(self, logits: torch.Tensor, bv, K: int, clean_logits: torch.Tensor) -> torch.Tensor:
        """``[K]``: the criterion summed over ``bv``'s pairs for each of ``K`` copies (copy-major ``logits``)."""
        big = bv.pairs.repeat(K)
        if self.criterion == "kl":
            value = evaluate_metric(KLToClean(), logits, big, clean_logits)
        else:
            value = -evaluate_metric(self.metric, logits, big, clean_logits)
        return value.double().view(K, len(bv.pairs)).sum(1).cpu()

    def try_removal(self, keep: torch.Tensor, cell: tuple) -> torch.Tensor:
        """The criterion of each state in ``keep`` (``[K *graph.shape]``) with ``cell`` removed.

        On the native runner, when ``cell``'s reader is a head, every state's head inputs and outputs at
        that layer are cached (:meth:`NativeEdgeRunner.start_cache`) and only the one reader and its head
        are recomputed; :meth:`commit` carries the cache over to the next list of states.
        """
        trials = keep.clone()
        trials[(slice(None),) + tuple(cell)] = False
        layer = int(self.runners[0].reader_layer[cell[1]]) if self.runners is not None and len(cell) == 2 else None
        if layer is None or layer >= self.graph.n_layers or cell[1] not in range(
                *self.graph.reader_slice("head", layer).indices(self.graph.n_readers)):
            self.caches = None  # the output and MLP readers: a plain evaluation (and the next head rebuilds)
            return self(trials)
        K = keep.shape[0]
        total = torch.zeros(K, dtype=torch.float64)
        if self.caches is None or self.caches[0]["layer"] != layer:
            states_w = (~keep).float()
            self.caches = [runner.start_cache(states_w.to(bv.replacement.device), layer, rp)
                           for runner, bv, rp in zip(self.runners, self.batches, self.read_pos)]
        w = (~trials).float()
        for i, bv in enumerate(self.batches):
            logits = self.runners[i].logits(w.to(bv.replacement.device), self.read_pos[i], cache=self.caches[i],
                                            reader=int(cell[1]))
            total += self._criterion(logits, bv, K, self.clean_read[i])
            self.forwards += 1  # one batched run per batch of pairs, as :meth:`__call__` counts
        return total / self.n

    def commit(self, picks: list[tuple[int, bool]]) -> None:
        """The states after a :meth:`try_removal`: state ``j`` is old state ``picks[j][0]``, with the tried
        removal where ``picks[j][1]``."""
        if self.caches is None:
            return
        if all(not t for _, t in picks) and [k for k, _ in picks] == list(range(len(picks))):
            return
        self.caches = [runner.commit_cache(c, picks) for runner, c in zip(self.runners, self.caches)]


def _candidate_groups(graph: ComponentGraph, valid: torch.Tensor) -> list[list[tuple]]:
    """The cells ACDC tries, in order: one group per reader from the output back (latest source
    first), per reader and position on per-position graphs; at node level one group, latest first."""
    groups = []
    if graph.level == "node":
        cells = [tuple(c) for c in valid.nonzero().tolist()]
        groups.append(sorted(cells, key=lambda c: c[-1], reverse=True))
    else:
        for r in reversed(range(graph.n_readers)):
            sources = [s for s in reversed(range(graph.n_sources)) if bool(graph.valid[s, r])]
            positions = range(graph.n_pos) if graph.per_position else [None]
            for p in positions:
                groups.append([(s, r) if p is None else (p, s, r) for s in sources])
    return groups


def acdc(model, pairs: PromptPairs, *, metric: Metric, graph: ComponentGraph, ablation: str = "corrupt",
         batch_size: int = 64, threshold: float = 0.01, criterion: str = "kl",
         candidates_per_forward: int = 32, mean_values: Optional[torch.Tensor] = None) -> Circuit:
    """The ACDC circuit at ``threshold``; ``scores`` hold each edge's criterion change when tried."""
    if criterion not in CRITERIA:
        raise CircuitKDError(f"unknown ACDC criterion {criterion!r}; expected one of {CRITERIA}")
    if candidates_per_forward < 1:
        raise CircuitKDError(f"candidates_per_forward must be >= 1, got {candidates_per_forward}")
    evaluate = _Evaluator(model, graph, pairs, metric, criterion, ablation, batch_size, mean_values)
    shape = graph.shape
    node_level = graph.level == "node"
    valid = torch.ones(shape, dtype=torch.bool) if node_level else graph.valid.expand(shape).clone()
    keep = valid.clone()
    scores = torch.zeros(shape)
    current = float(evaluate(keep[None])[0])

    for cand in _candidate_groups(graph, valid):
        # Adaptive batch: a rejection wastes the prefixes after it, so grow the batch while removals
        # are accepted and fall back to one candidate after a rejection.
        width = 1
        while cand:
            chunk = cand[:width]
            trial = keep.clone()
            prefixes = []
            for cell in chunk:
                trial[cell] = False
                prefixes.append(trial.clone())
            values = evaluate(torch.stack(prefixes))
            prev = current
            rejected_at = None
            for j, cell in enumerate(chunk):
                damage = float(values[j]) - prev
                scores[cell] = damage
                if damage < threshold:
                    keep[cell] = False
                    prev = float(values[j])
                else:
                    rejected_at = j
                    break
            current = prev
            cand = cand[(rejected_at + 1) if rejected_at is not None else len(chunk):]
            width = 1 if rejected_at is not None else min(candidates_per_forward, 2 * width)
    return Circuit(graph, scores, keep, method="acdc",
                   info={"ablation": ablation, "threshold": threshold, "criterion": criterion,
                         "n_pairs": len(pairs), "forwards": evaluate.forwards, "final_value": current})


def acdc_sweep(model, pairs: PromptPairs, *, metric: Metric, graph: ComponentGraph, thresholds,
               ablation: str = "corrupt", batch_size: int = 64, criterion: str = "kl",
               mean_values: Optional[torch.Tensor] = None) -> list[Circuit]:
    """:func:`acdc` at every threshold in ``thresholds``, sharing the work between them.

    Each threshold's run is the plain sequential algorithm, exactly (same candidates, same order,
    same decisions, same scores as ``acdc(threshold=t)``). The runs share one evaluator (the clean
    and corrupt caches and the native runner's projections) and advance in lockstep: runs whose
    circuits are still identical are one *state*, every candidate is tried on every distinct state
    in one batched forward, and a state splits only when a candidate's damage falls between its
    thresholds. A sweep therefore costs one forward per candidate edge, with at most
    ``len(thresholds)`` copies, instead of a whole ACDC run per threshold.
    Returns one :class:`Circuit` per threshold, in the order given.
    """
    if criterion not in CRITERIA:
        raise CircuitKDError(f"unknown ACDC criterion {criterion!r}; expected one of {CRITERIA}")
    thresholds = [float(t) for t in thresholds]
    if not thresholds:
        raise CircuitKDError("acdc_sweep needs at least one threshold")
    evaluate = _Evaluator(model, graph, pairs, metric, criterion, ablation, batch_size, mean_values)
    valid = torch.ones(graph.shape, dtype=torch.bool) if graph.level == "node" else graph.valid.expand(graph.shape).clone()
    start = float(evaluate(valid[None])[0])
    # a state: [keep mask, scores, current criterion value, indices of the thresholds in it]
    states = [[valid.clone(), torch.zeros(graph.shape), start, list(range(len(thresholds)))]]
    for cand in _candidate_groups(graph, valid):
        for cell in cand:
            values = evaluate.try_removal(torch.stack([st[0] for st in states]), cell)
            picks = [(k, False) for k in range(len(states))]  # which old state (and trial) each state now is
            for k, (st, value) in enumerate(zip(list(states), values.tolist())):
                damage = value - st[2]
                st[1][cell] = damage
                removed = [i for i in st[3] if damage < thresholds[i]]
                if not removed:
                    continue
                if len(removed) < len(st[3]):  # the runs part here: the removing ones become a new state
                    st[3] = [i for i in st[3] if i not in removed]
                    st = [st[0].clone(), st[1].clone(), st[2], removed]
                    states.append(st)
                    picks.append((k, True))
                else:
                    picks[k] = (k, True)
                st[0][cell] = False
                st[2] = value
            evaluate.commit(picks)
    out: list[Optional[Circuit]] = [None] * len(thresholds)
    for keep, scores, current, members in states:
        for i in members:
            out[i] = Circuit(graph, scores.clone(), keep.clone(), method="acdc",
                             info={"ablation": ablation, "threshold": thresholds[i], "criterion": criterion,
                                   "n_pairs": len(pairs), "forwards": evaluate.forwards, "final_value": current,
                                   "sweep": len(thresholds)})
    return out
