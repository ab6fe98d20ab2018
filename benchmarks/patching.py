"""Head × position activation patching: circuitkd vs ``transformer_lens.patching``.

Times ``get_act_patch_attn_head_out_by_pos`` (one bridge forward per head × position)
against ``circuitkd.patch(site="head_pos")`` on the same model and inputs, in one run,
checks the results agree, and prints the ratio and both peak memories (CUDA peak
allocation on a GPU; on CPU the peak traced by tracemalloc is not meaningful for torch,
so the peak resident set growth measured in a fresh subprocess per method is reported).
Repeats are interleaved (TransformerLens, circuitkd, then the other way round) and each time is
the minimum, so load on a shared machine falls on both. On CPU each circuitkd row also gives the
FLOPs it executed (``torch.utils.flop_counter``, an untimed second call) over its time, beside
the best ``torch.matmul`` rate of the model's shapes measured in the same run, and TransformerLens's
FLOPs too (their ratio is the speed-up the arithmetic allows at equal GFLOP/s).
It also reports attribution patching's time and its correlation with exact patching.

    python benchmarks/patching.py                       # student and teacher, CPU, 1 thread
    python benchmarks/patching.py --device cuda --n 1024 --methods fast,stacked   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch


def build(preset: str, device: str, seed: int = 0):
    from circuitkd import ModelSpec, build_model

    return build_model(ModelSpec.preset(preset).replace(d_vocab=60, n_ctx=24, n_classes=3, seed=seed), device=device)


def make_pairs(n: int, pos: int, seed: int = 0):
    from circuitkd import PromptPairs

    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 60, (n, pos), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:8] = torch.randint(1, 60, (n, 6), generator=g)
    answer = torch.randint(0, 3, (n,), generator=g)
    return PromptPairs(clean=clean, corrupt=corrupt, clean_answer=answer, corrupt_answer=(answer + 1) % 3, position=0)


def run_one(args) -> dict:
    """One timed method in this process: returns seconds, peak memory and the result."""
    torch.set_num_threads(args.threads)
    import circuitkd as ckd
    from circuitkd.patching import patch

    model = build(args.model, args.device)
    pairs = make_pairs(args.n, args.pos)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    if args.method == "tl":
        from transformer_lens import patching as tlp

        p = pairs.to(dev)
        a, b = p.clean_answer[:, None], p.corrupt_answer[:, None]

        def metric(logits):
            at = logits[:, 0] if logits.ndim == 3 else logits  # HF BERT's bridge emits class logits, read at CLS
            return (at.gather(1, a) - at.gather(1, b)).mean()

        def call():
            with torch.inference_mode():
                _, cache = model.run_with_cache(p.clean)
                import tqdm.auto  # noqa: F401  (TL's progress bar; silenced below)
                return tlp.get_act_patch_attn_head_out_by_pos(model, p.corrupt, cache, metric)
        result = call().permute(0, 2, 1)  # [layer pos head] -> [layer head pos]
    else:
        def call():
            if args.method == "attribution":
                return ckd.attribution_patch(model, pairs, site="head_pos", normalise=False,
                                             batch_size=args.batch_size)
            return patch(model, pairs, site="head_pos", normalise=False, method=args.method,
                         batch_size=args.batch_size)
        result = call()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _peak_rss_mb() - rss0
    out = {"seconds": seconds, "peak_mb": peak, "result": result.float().cpu().tolist()}
    if args.flops:  # the same call again, untimed, under torch's FLOP counter
        from _common import count_flops

        out["flops"] = count_flops(call)
    return out


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return 0.0


def measure(model: str, method: str, args, flops: bool = False) -> dict:
    """Run one method in a fresh subprocess so that its peak memory is its own."""
    cmd = [sys.executable, __file__, "--_one", "--model", model, "--method", method, "--n", str(args.n),
           "--pos", str(args.pos), "--threads", str(args.threads), "--device", args.device,
           "--batch-size", str(args.batch_size)] + (["--flops"] if flops else [])
    env = dict(os.environ, TQDM_DISABLE="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="student,teacher")
    ap.add_argument("--methods", default="fast", help="circuitkd methods to time against TL: fast, stacked")
    ap.add_argument("--n", type=int, default=64, help="number of clean/corrupt pairs")
    ap.add_argument("--pos", type=int, default=24, help="tokens per input")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats; each time is the best")
    ap.add_argument("--no-attribution", action="store_true")
    # internal: run a single method
    ap.add_argument("--_one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="student", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="fast", help=argparse.SUPPRESS)
    ap.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(run_one(args)))
        return
    from circuitkd.patching import correlation

    print(f"head x position patching, {args.n} pairs x {args.pos} tokens, device={args.device}, "
          f"threads={args.threads}, batch_size={args.batch_size}")
    torch.set_num_threads(args.threads)
    for model in args.models.split(","):
        methods = ["tl", *args.methods.split(",")]
        best: dict = {}
        for r in range(args.repeats):  # interleaved (TL, circuitkd, ... then reversed): load falls on both
            for m in (methods if r % 2 == 0 else methods[::-1]):
                res = measure(model, m, args, flops=(r == 0 and args.device == "cpu"))
                if m in best:
                    res.setdefault("flops", best[m].get("flops"))
                best[m] = res if m not in best or res["seconds"] < best[m]["seconds"] else best[m]
        tl = best["tl"]
        tl_res = torch.tensor(tl["result"])
        if args.device == "cpu":
            from _common import matmul_peak

            cfg = build(model, "cpu").cfg
            rows, d = min(args.n, args.batch_size) * args.pos, int(cfg.d_model)
            peak, _ = matmul_peak([(rows, d, d), (rows, d, 3 * d), (rows, d, int(cfg.d_mlp or 4 * d))])
            print(f"\n[{model}] matmul peak of the model's shapes (this run, {args.threads} thread): {peak:.1f} GFLOP/s")
        tl_rate = ""
        if tl.get("flops"):
            gfs = tl["flops"] / tl["seconds"] / 1e9
            tl_rate = f", {tl['flops'] / 1e9:.2f} GFLOP executed, {gfs:.2f} GFLOP/s ({gfs / peak:.1%} of peak)"
        print(f"[{model}] transformer_lens.patching: {tl['seconds']:.2f} s, peak {tl['peak_mb']:.1f} MB "
              f"({tl_res.numel()} patched forwards){tl_rate}")
        exact = None
        for method in args.methods.split(","):
            r = best[method]
            res = torch.tensor(r["result"])
            exact = res
            err = (res - tl_res).abs().max().item()
            rate = ""
            if r.get("flops"):
                gfs = r["flops"] / r["seconds"] / 1e9
                rate = f", {r['flops'] / 1e9:.2f} GFLOP executed, {gfs:.2f} GFLOP/s ({gfs / peak:.1%} of peak)"
                if tl.get("flops"):  # the speed-up the FLOPs allow at equal GFLOP/s
                    rate += f"; TL executes x{tl['flops'] / r['flops']:.1f} its FLOPs"
            print(f"[{model}] circuitkd {method:8s}: {r['seconds']:.2f} s, peak {r['peak_mb']:.1f} MB, "
                  f"speed-up x{tl['seconds'] / r['seconds']:.1f} (target x10), max |diff| vs TL {err:.1e}{rate}")
        if not args.no_attribution:
            a = measure(model, "attribution", args)
            ares = torch.tensor(a["result"])
            print(f"[{model}] attribution patching: {a['seconds']:.2f} s (x{tl['seconds'] / a['seconds']:.0f} vs TL), "
                  f"Pearson r with exact patching {correlation(ares - ares.mean(), exact):.3f}")


if __name__ == "__main__":
    main()
