"""Clean-corrupted edge attribution: EAP-IG with only the two end points of the path (Hanna, Pezzelle &
Belinkov 2024; one of the methods MIB's circuit track compares, Mueller et al. 2025).

The gradient at each reader's input is taken on the clean run and on the corrupt run and averaged,
then contracted with ``corrupt_src - clean_src`` as in EAP::

    score(src -> dst) = mean_pairs sum_pos (corrupt_src - clean_src) . (g_dst(clean) + g_dst(corrupt)) / 2

where ``g_dst(x) = d metric / d (input of dst)`` on the plain run of input ``x``. This is the
method ``clean-corrupted`` of MIB's EAP-IG library (``get_scores_clean_corrupted``). Only
corrupt-activation ablation is defined (the path's end point is the corrupt run).
"""
from __future__ import annotations

from circuitkd.circuits.base import batches
from circuitkd.circuits.eap import scores_from_gradients
from circuitkd.circuits.gradients import add_gradients, check_edge_graph, source_deltas, summed_reader_gradients
from circuitkd.circuits.graph import Circuit, ComponentGraph
from circuitkd.errors import CircuitKDError
from circuitkd.metrics import Metric
from circuitkd.types import PromptPairs


def clean_corrupted(model, pairs: PromptPairs, *, metric: Metric, graph: ComponentGraph, ablation: str = "corrupt",
                    batch_size: int = 32) -> Circuit:
    """Clean-corrupted edge scores ``[source reader]`` (``[pos source reader]`` per position).

    Per batch: one clean and one corrupt forward for the source values, one forward recording
    the differences, and a forward + backward on each of the clean and the corrupt input. On a
    post-LN model each run's norms are frozen at that run's own scales (the clean run's for the
    differences), as in denoising EAP.
    """
    check_edge_graph(graph, "clean-corrupted")
    if ablation != "corrupt":
        raise CircuitKDError(f"clean-corrupted takes the gradient on the corrupt run, so ablation must be "
                             f"'corrupt', got {ablation!r}")
    total, n = None, 0
    for bv in batches(model, graph, pairs, batch_size=batch_size, ablation=ablation):
        deltas = source_deltas(model, graph, bv)
        grads = summed_reader_gradients(model, graph, bv, metric, bv.pairs.clean, norm_scales=bv.clean.norm_scales)
        grads = add_gradients(grads, summed_reader_gradients(model, graph, bv, metric, bv.pairs.corrupt,
                                                             norm_scales=bv.corrupt.norm_scales))
        s = scores_from_gradients(graph, deltas, {k: v / 2 for k, v in grads.items()})
        total = s if total is None else total + s
        n += len(bv.pairs)
    return Circuit(graph, (total / n).float(), method="clean-corrupted", info={"ablation": ablation, "n_pairs": n})
