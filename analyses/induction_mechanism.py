"""Where each circuit method ranks the edges of a known induction mechanism (issue 15).

Models (:mod:`circuitkd.circuits.mechanisms`): the hand-set 2-layer attention-only induction model
(2 heads, mechanism known by construction) and 2-layer attention-only models with 4 heads per layer
(81 edges) trained here on repeated random segments, whose previous-token (PT) and induction (IND)
heads are read from attention patterns alone. For each model and method the table gives the 1-based
rank by ``|score|`` of the mechanism's four edges, the key-composition edge ``PT -> IND<k>`` first,
and the ranks of every key-composition edge between a head with prev-token score > 0.5 and one with
induction score > 0.5 (trained models have several).

    python analyses/induction_mechanism.py [--seeds 0 1 2] [--ig-steps 50] [--train-steps 800]

Methods: exact edge patching; EAP; EAP-IG over inputs (MIB's EAP-IG-inputs); EAP-IG over each node
group's activations (MIB's EAP-IG-activations); clean-corrupted (MIB); auto-circuit's mask-gradient IG.
One thread; timings are wall-clock on a shared machine (noisy).
"""
from __future__ import annotations

import argparse
import time

import torch

import circuitkd.circuits as C
from circuitkd.circuits import mechanisms as M

METHODS = ("exact", "eap", "eap-ig", "eap-ig-activations", "clean-corrupted", "mask-gradient-ig")
EDGE_NAMES = ("PT -> IND<k>", "embed -> PT<v>", "embed -> IND<v>", "IND -> output")


def method_options(method: str, ig_steps: int) -> dict:
    return {"steps": ig_steps} if method in ("eap-ig", "eap-ig-activations", "mask-gradient-ig") else {}


def rank_table(model, pairs, roles: dict, ig_steps: int) -> list[dict]:
    """One row per method: ranks of the mechanism's edges and of every key-composition edge between role heads."""
    pt, ind = int(roles["prev_token"].argmax()), int(roles["induction"].argmax())
    mechanism = M.induction_mechanism(pt, ind)
    pts = [h for h in range(len(roles["prev_token"])) if roles["prev_token"][h] > 0.5] or [pt]
    inds = [h for h in range(len(roles["induction"])) if roles["induction"][h] > 0.5] or [ind]
    kcomp = [M.induction_mechanism(p, i)["PT -> IND<k>"] for p in pts for i in inds]
    rows = []
    for method in METHODS:
        start = time.perf_counter()
        circuit = C.discover(model, pairs, method, batch_size=len(pairs), **method_options(method, ig_steps))
        seconds = time.perf_counter() - start
        ranks = M.edge_ranks(circuit, list(mechanism.values()) + kcomp)
        kscore = float(circuit.scores[circuit.graph.edge_cell(mechanism["PT -> IND<k>"])])
        rows.append({"method": method, "seconds": seconds, "k_score": kscore,
                     **{name: ranks[mechanism[name]] for name in EDGE_NAMES},
                     "all_k": sorted(ranks[e] for e in kcomp)})
    return rows


def print_table(title: str, rows: list[dict], n_edges: int) -> None:
    print(f"\n{title} ({n_edges} edges)")
    head = f"{'method':20s} {'PT->IND<k>':>10s} {'emb->PT<v>':>10s} {'emb->IND<v>':>11s} {'IND->out':>8s}" \
           f" {'K-comp score':>12s} {'time':>6s}  every K-comp edge's rank"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['method']:20s} {r['PT -> IND<k>']:>10d} {r['embed -> PT<v>']:>10d} {r['embed -> IND<v>']:>11d} "
              f"{r['IND -> output']:>8d} {r['k_score']:>12.3f} {r['seconds']:>5.1f}s  {r['all_k']}")


def rounded(scores) -> list[float]:
    return [round(float(x), 2) for x in scores]


def print_summary(per_model: list[list[dict]]) -> None:
    """Across the trained models: each method's ranks of PT -> IND<k>, of the best key-composition edge, and
    how often its key-composition score has exact patching's sign."""
    print(f"\nsummary over {len(per_model)} trained models (81 edges each)")
    head = f"{'method':20s} {'PT->IND<k> ranks':>18s} {'best K-comp ranks':>18s} {'sign as exact':>14s}"
    print(head)
    print("-" * len(head))
    exact_sign = [next(r for r in rows if r["method"] == "exact")["k_score"] > 0 for rows in per_model]
    for i, method in enumerate(METHODS):
        rows = [model_rows[i] for model_rows in per_model]
        key = ", ".join(str(r["PT -> IND<k>"]) for r in rows)
        best = ", ".join(str(r["all_k"][0]) for r in rows)
        same = sum((r["k_score"] > 0) == s for r, s in zip(rows, exact_sign))
        print(f"{method:20s} {key:>18s} {best:>18s} {f'{same}/{len(rows)}':>14s}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=800)
    parser.add_argument("--n-pairs", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, pairs = M.hand_induction_model(), M.induction_pairs()
    roles = M.induction_roles(model, pairs)
    print(f"hand-set model: prev-token scores {rounded(roles['prev_token'])}, "
          f"induction scores {rounded(roles['induction'])}; {len(pairs)} pairs")
    print_table("hand-set, PT = 0.0, IND = 1.0", rank_table(model, pairs, roles, args.ig_steps),
                C.ComponentGraph.from_model(model).n_edges)

    trained = []
    for seed in args.seeds:
        start = time.perf_counter()
        model = M.train_induction_model(seed=seed, steps=args.train_steps)
        seconds = time.perf_counter() - start
        pairs = M.induction_pairs(args.n_pairs, seed=100 + seed, vocab=24, half=8)
        with torch.no_grad():
            logits = model(pairs.clean)
        acc = float((logits[:, 8:-1].argmax(-1) == pairs.clean[:, 9:]).float().mean())
        roles = M.induction_roles(model, pairs)
        pt, ind = int(roles["prev_token"].argmax()), int(roles["induction"].argmax())
        print(f"\ntrained seed {seed}: {args.train_steps} steps in {seconds:.0f} s, repeat accuracy {acc:.3f}; "
              f"prev-token scores {rounded(roles['prev_token'])}, induction scores {rounded(roles['induction'])}; "
              f"{len(pairs)} pairs")
        rows = rank_table(model, pairs, roles, args.ig_steps)
        print_table(f"trained seed {seed}, PT = 0.{pt}, IND = 1.{ind}", rows, C.ComponentGraph.from_model(model).n_edges)
        trained.append(rows)
    if trained:
        print_summary(trained)


if __name__ == "__main__":
    main()
