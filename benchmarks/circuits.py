"""Circuit-discovery timings, each method beside its obvious unbatched baseline, in one run.

Model: a 2-layer attention-only causal native bridge with 4 heads per layer (81 edges);
32 clean/corrupt pairs of 16 tokens; one thread. Every ratio printed is against a baseline
timed in the same run on the same work; no figure here is a constant.

    python benchmarks/circuits.py
    python benchmarks/circuits.py --device cuda --spec '{"n_layers": 12, "d_model": 768, "n_heads": 12}' --rows eap-ig,exact

The second ACDC row times the same sweep through the hooked ``patched_forward`` (ACDC's
evaluator before the native runner).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import circuitkd.circuits as C
from circuitkd.circuits.forward import patched_forward, source_values
from circuitkd.config import ModelSpec
from circuitkd.models.build import build_model
from circuitkd.types import PromptPairs

def setup(n_pairs: int = 32, seq: int = 16, device: str = "cpu", spec: dict | None = None):
    spec = ModelSpec(backbone="native", causal=True, attn_only=True, n_layers=2, n_heads=4, d_model=64,
                     d_vocab=50, n_ctx=seq, seed=0).replace(**(spec or {}))
    model = build_model(spec, device=device)
    g = torch.Generator().manual_seed(0)
    half = torch.randint(0, 50, (n_pairs, seq // 2), generator=g)
    other = torch.randint(0, 50, (n_pairs, seq // 2), generator=g)
    pairs = PromptPairs(clean=torch.cat([half, half], 1), corrupt=torch.cat([other, half], 1),
                        clean_answer=half[:, -1], corrupt_answer=other[:, -1], position=seq - 2)
    return model, pairs


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def naive_eap(model, pairs, graph):
    """One backward per edge: d metric / d alpha for alpha scaling that edge's ablation."""
    clean = source_values(model, graph, pairs.clean)
    corrupt = source_values(model, graph, pairs.corrupt)
    out = torch.zeros(graph.shape)
    for s, r in graph.valid.nonzero().tolist():
        alpha = torch.zeros((), requires_grad=True)
        w = torch.zeros(graph.shape)
        w[s, r] = 1.0
        run = patched_forward(model, graph, pairs.clean, ablate=(alpha * w)[None], replacement=corrupt.outputs,
                              norm_scales=clean.norm_scales)
        (out[s, r],) = torch.autograd.grad(C.logit_diff(run.logits, pairs).mean(), alpha)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--spec", default="{}", help="JSON of ModelSpec fields replacing the 2-layer model's")
    ap.add_argument("--rows", default="eap,eap-ig,acdc,exact", help="comma list of the rows to time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, pairs = setup(device=args.device, spec=json.loads(args.spec))
    rows_wanted = set(args.rows.split(","))
    graph = C.ComponentGraph.from_model(model)
    print(f"graph: {graph.describe()}, {graph.n_edges} edges; {len(pairs)} pairs x {pairs.clean.shape[1]} tokens")
    metric = C.logit_diff
    thresholds = torch.logspace(-4, 0, 20).tolist()
    rows = []

    if "eap" in rows_wanted:
        t_fast, eap = timed(lambda: C.eap(model, pairs, metric=metric, graph=graph, batch_size=64))
        t_slow, naive = timed(lambda: naive_eap(model, pairs, graph))
        assert torch.allclose(eap.scores, naive, atol=1e-5)
        rows.append(("eap", t_fast, "one backward per edge", t_slow))
    if "eap-ig" in rows_wanted:
        eap_ig_row(model, pairs, graph, metric, rows)
    if "acdc" in rows_wanted:
        acdc_rows(model, pairs, graph, metric, thresholds, rows)
    if "exact" in rows_wanted:
        exact_row(model, pairs, graph, metric, rows)

    print(f"{'method':<22}{'circuitkd':>11}{'baseline':>11}{'speed-up':>10}  baseline")
    for name, fast_s, base_name, slow_s in rows:
        print(f"{name:<22}{fast_s:>10.2f}s{slow_s:>10.2f}s{slow_s / fast_s:>9.1f}x  {base_name}")


def eap_ig_row(model, pairs, graph, metric, rows) -> None:
    t_fast, ig = timed(lambda: C.eap_ig(model, pairs, metric=metric, graph=graph, steps=50, batch_size=64,
                                        steps_per_forward=25))
    t_slow, ig1 = timed(lambda: C.eap_ig(model, pairs, metric=metric, graph=graph, steps=50, batch_size=64,
                                         steps_per_forward=1))
    assert torch.allclose(ig.scores, ig1.scores, atol=1e-5)
    rows.append(("eap-ig (50 steps)", t_fast, "one forward+backward per step", t_slow))


def acdc_rows(model, pairs, graph, metric, thresholds, rows) -> None:
    def acdc_sweep(per):
        return [C.acdc(model, pairs, metric=metric, graph=graph, threshold=t, batch_size=64,
                       candidates_per_forward=per) for t in thresholds]
    t_fast, fast = timed(lambda: acdc_sweep(32))
    t_slow, slow = timed(lambda: acdc_sweep(1))
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(fast, slow))
    rows.append(("acdc (20 thresholds)", t_fast, "one candidate per forward", t_slow))
    with C.hooked_only():  # the hooked patched_forward ACDC used before the native runner
        t_hooked, hooked = timed(lambda: acdc_sweep(32))
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(fast, hooked))
    rows.append(("acdc (20 thresholds)", t_fast, "same, hooked patched_forward", t_hooked))


def exact_row(model, pairs, graph, metric, rows) -> None:
    t_fast, ex = timed(lambda: C.exact(model, pairs, metric=metric, graph=graph, batch_size=64))
    t_slow, ex1 = timed(lambda: C.exact(model, pairs, metric=metric, graph=graph, batch_size=64, edges_per_forward=1))
    assert torch.allclose(ex.scores, ex1.scores, atol=1e-5)
    rows.append(("exact", t_fast, "one edge per forward", t_slow))


if __name__ == "__main__":
    main()
