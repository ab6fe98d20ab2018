"""The auto-circuit side of ``benchmarks/peers.py``; runs in the peer venv (benchmarks/peers_venv.py).

It imports nothing from circuitkd (that venv cannot hold transformer-lens 4). The driver writes
one file holding a native model's weights, its config, the prompts and circuitkd's logits on the
clean prompts; this worker rebuilds the weights as a TransformerLens 2.x ``HookedTransformer``,
refuses to go on unless its logits agree with circuitkd's to ``--atol``, wraps it with
auto-circuit's ``patchable_model`` and then serves timing requests, one JSON line per request on
stdin, one JSON line per answer on stdout, so the driver can interleave peer and circuitkd runs:

    {"method": "eap"}  ->  {"seconds": ..., "scores": [[...]]}     (scores in circuitkd's [source reader] layout)

Methods, all on one batch holding every prompt, corrupt-activation (resample) ablation, logit
difference of answer vs wrong answer at the last position:

- ``eap``: ``mask_gradient_prune_scores(grad_function="logit", answer_function="avg_diff",
  mask_val=0)``, auto-circuit's EAP (their registry's "Edge Attribution Patching");
- ``ig``: the same with ``integrated_grad_samples=steps`` (mask-gradient integrated gradients);
- ``acdc``: ``acdc_prune_scores`` with its default 20 thresholds (1,3,5,7,9 x 1e-5..1e-2), KL;
- ``exact``: each edge ablated alone: ``patch_mode`` with the corrupt source outputs, the edge's
  mask set to 1, one full forward. (The faster idiom inside auto-circuit's ACDC, starting the
  forward at the edge's layer with ``curr_src_outs``, gives different scores for edges from
  layer-0 heads into layer-1 readers on this model: 3e-2 off both circuitkd and the full forward,
  so it is not used for exact scores.)

auto-circuit scores are gradients of ``-logit_diff`` w.r.t. a mask that moves an edge from clean
to corrupt (summed over IG's samples); the worker negates EAP/IG scores and divides IG's by its
sample count, so that they read like circuitkd's (mean metric change when the edge is ablated).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch as t


def build(blob: dict):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = blob["config"]
    cfg = HookedTransformerConfig(
        n_layers=c["n_layers"], d_model=c["d_model"], n_ctx=c["n_ctx"], d_head=c["d_head"],
        n_heads=c["n_heads"], d_vocab=c["d_vocab"], d_vocab_out=c["d_vocab_out"], attn_only=True,
        normalization_type="LN", positional_embedding_type="standard", eps=c["eps"],
        attn_scale=c["attn_scale"], default_prepend_bos=False, device="cpu", seed=0,
    )
    model = HookedTransformer(cfg)
    missing, unexpected = model.load_state_dict(blob["weights"], strict=False)
    missing = [k for k in missing if not k.endswith(("IGNORE", "mask"))]
    if missing or unexpected:
        raise SystemExit(f"weights do not fit the HookedTransformer: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model


def check_logits(model, blob: dict, atol: float) -> float:
    with t.no_grad():
        logits = model(blob["clean"])
    err = float((logits - blob["logits"]).abs().max())
    if not err <= atol:
        raise SystemExit(f"TL 2.x logits differ from circuitkd's by {err:.2e} > {atol:.0e}: not timing")
    return err


class Peer:
    def __init__(self, blob: dict, atol: float):
        from auto_circuit.data import PromptDataLoader, PromptDataset
        from auto_circuit.utils.graph_utils import patchable_model

        self.blob = blob
        self.tl = build(blob)
        self.logit_err = check_logits(self.tl, blob, atol)
        self.tl.set_use_attn_result(True)
        self.tl.set_use_split_qkv_input(True)
        self.model = patchable_model(self.tl, factorized=True, slice_output="last_seq", separate_qkv=True,
                                     device=t.device("cpu"))
        n = blob["clean"].shape[0]
        ds = PromptDataset(list(blob["clean"]), list(blob["corrupt"]),
                           [a.view(1) for a in blob["answers"]], [a.view(1) for a in blob["wrong_answers"]])
        self.loader = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=n, shuffle=False)
        self.n_edges = len(self.model.edges)

    # ------------------------------------------------------------------ edge layout
    def to_matrix(self, prune_scores: dict) -> list:
        """auto-circuit's per-destination score tensors -> circuitkd's dense ``[source reader]`` list."""
        c = self.blob["config"]
        L, H = c["n_layers"], c["n_heads"]
        sources = ["Resid Start"] + [f"A{layer}.{h}" for layer in range(L) for h in range(H)]
        readers = [f"A{layer}.{h}.{p}" for layer in range(L) for h in range(H) for p in "QKV"] + ["Resid End"]
        si = {name: i for i, name in enumerate(sources)}
        ri = {name: i for i, name in enumerate(readers)}
        out = t.zeros(len(sources), len(readers), dtype=t.float64)
        for edge in self.model.edges:
            out[si[edge.src.name], ri[edge.dest.name]] = float(edge.prune_score(prune_scores))
        return out.tolist()

    # ------------------------------------------------------------------ methods
    def eap(self, **_):
        from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores

        ps = mask_gradient_prune_scores(self.model, self.loader, None, grad_function="logit",
                                        answer_function="avg_diff", mask_val=0.0)
        return {k: -v for k, v in ps.items()}

    def ig(self, steps: int = 50, **_):
        from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores

        ps = mask_gradient_prune_scores(self.model, self.loader, None, grad_function="logit",
                                        answer_function="avg_diff", integrated_grad_samples=steps)
        # auto-circuit accumulates (sums) the gradients of its steps + 1 samples (mask k/steps, k = 0..steps)
        return {k: -v / (steps + 1) for k, v in ps.items()}

    def acdc(self, **_):
        from auto_circuit.prune_algos.ACDC import acdc_prune_scores

        return acdc_prune_scores(self.model, self.loader, None)

    def exact(self, **_):
        from auto_circuit.utils.ablation_activations import src_ablations
        from auto_circuit.utils.graph_utils import patch_mode, set_all_masks
        from auto_circuit.utils.tensor_ops import batch_answer_diffs

        model = self.model
        batch = next(iter(self.loader))
        corrupt_outs = src_ablations(model, batch.corrupt)
        scores = model.new_prune_scores()
        with t.inference_mode():
            base = batch_answer_diffs(model(batch.clean)[model.out_slice], batch).mean()
        set_all_masks(model, val=0.0)
        with patch_mode(model, corrupt_outs):
            for edge in model.edges:
                edge.patch_mask(model).data[edge.patch_idx] = 1.0
                with t.inference_mode():
                    out = model(batch.clean)[model.out_slice]
                    scores[edge.dest.module_name][edge.patch_idx] = batch_answer_diffs(out, batch).mean() - base
                edge.patch_mask(model).data[edge.patch_idx] = 0.0
        return scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("blob")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    t.set_num_threads(args.threads)
    blob = t.load(args.blob)
    peer = Peer(blob, args.atol)
    print(json.dumps({"ready": True, "logit_max_abs_diff": peer.logit_err, "n_edges": peer.n_edges,
                      "versions": versions()}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        fn = getattr(peer, req["method"])
        start = time.perf_counter()
        scores = fn(**req.get("options", {}))
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "scores": peer.to_matrix(scores)}), flush=True)


def versions() -> dict:
    from importlib.metadata import version

    return {p: version(p) for p in ("auto-circuit", "transformer-lens", "torch")}


if __name__ == "__main__":
    main()
