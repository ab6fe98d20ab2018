"""The ``circuitkd`` command line.

``circuitkd run`` reproduces the study end to end: it trains and evaluates the grid of
teachers and students, analyses the teacher/student pairs that matter (patching,
attention diffing, circuits) and writes a self-contained HTML report into the run folder.
The other subcommands run one step each, on existing checkpoints or run folders.
Bad input ends with a non-zero exit and a one-line error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from circuitkd.errors import CircuitKDError

EPILOG = """examples:
  circuitkd run                          the default study, both arms (train, evaluate, analyse, report)
  circuitkd run --arm vision             the image arm alone (ViTs on MNIST with colour and cue shortcuts)
  circuitkd run --quick --out runs/q     a smoke run of a minute or two
  circuitkd run --config my.toml         a config of your own (JSON, TOML or YAML)
  circuitkd run --executor ray --ray-address auto --gpus-per-job 1   every job a task on a Ray cluster
  circuitkd train --preset teacher --debias poe --out ckpt/teacher
  circuitkd distill ckpt/teacher --preset student --alpha 0 --out ckpt/student
  circuitkd evaluate ckpt/student
  circuitkd patch ckpt/student --site head
  circuitkd diff ckpt/teacher ckpt/student
  circuitkd discover ckpt/student --method eap-ig --top-k 20 --out circuit.json
  circuitkd analyse runs/q && circuitkd report runs/q && circuitkd figures runs/q --out figures
"""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    """Bad flags end like every other bad input: ``circuitkd: error: ...`` and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"circuitkd: error: {message}\n")


def _number(kind: type, lo: Union[int, float], *, lo_open: bool = False, hi: Union[int, float, None] = None):
    """An argparse ``type=`` that parses ``kind`` and refuses values out of range (or NaN)."""
    bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        ok = (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
        if not ok:  # NaN fails every comparison
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


_SEED = _number(int, 0)
_COUNT = _number(int, 1)
_POSITIVE = _number(float, 0, lo_open=True)


def _json_flag(text: Optional[str], flag: str, default=None):
    """The JSON object passed to ``flag``; a CircuitKDError naming the flag when it is not one."""
    if text is None:
        return default
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CircuitKDError(f"{flag} is not valid JSON ({exc.msg} at char {exc.pos}): {text!r}") from None
    if not isinstance(value, dict):
        raise CircuitKDError(f"{flag} must be a JSON object of settings, got {text!r}")
    return value


# ------------------------------------------------------------------------- tasks


def _task_from_args(args: argparse.Namespace, checkpoint: Optional[Path] = None):
    """The task named on the command line, else the one a checkpoint was trained on."""
    from circuitkd.run.tasks import load_task_by_name
    from circuitkd.models.checkpoint import is_checkpoint, load_config

    name, task_args = args.task, _json_flag(args.task_args, "--task-args")
    if name is None and checkpoint is not None and is_checkpoint(checkpoint):
        saved = load_config(checkpoint)
        source = saved.get("task_source") or {"task": saved.get("task"), "args": {}}
        name = source["task"]
        if task_args is None:
            task_args = source.get("args")
    return load_task_by_name(name or "synthetic_nli", task_args or {})


def _add_task(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help="synthetic_nli (default), colored_mnist, mnli, hans, snli, waterbirds or celeba; "
                                  "default: the task the checkpoint was trained on")
    p.add_argument("--task-args", help="JSON of the task's arguments, e.g. '{\"seed\": 0, \"strength\": 0.9}'")


def _load(path: str, args: argparse.Namespace):
    from circuitkd.models import load_checkpoint

    return load_checkpoint(path, device=getattr(args, "device", None))


# ------------------------------------------------------------------- subcommands


def _run(args: argparse.Namespace) -> int:
    from circuitkd.run.plan import ARMS, arm_config_path, load_config

    if args.config is not None and args.arm is not None:
        raise CircuitKDError(f"--arm {args.arm} picks a shipped config; --config {args.config} runs that config alone: "
                             "give one of them")
    arms = list(ARMS) if args.config is None and args.arm in (None, "all") else [args.arm]
    cfgs = {arm: load_config(args.config if arm is None else arm_config_path(arm), quick=args.quick,
                             workers=args.workers, device=args.device, executor=args.executor,
                             ray_address=args.ray_address, cpus_per_job=args.cpus_per_job,
                             gpus_per_job=args.gpus_per_job) for arm in arms}
    if any(cfg.executor != "ray" for cfg in cfgs.values()) and (
            args.ray_address or args.cpus_per_job or args.gpus_per_job is not None):
        raise CircuitKDError("--ray-address, --cpus-per-job and --gpus-per-job need --executor ray")
    name = next(iter(cfgs.values())).name if len(cfgs) == 1 else "study"
    out = Path(args.out) if args.out else Path("runs") / f"{name}{'-quick' if args.quick and len(cfgs) > 1 else ''}-" \
                                                         f"{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for cfg in cfgs.values():
            if cfg.executor == "ray":
                from circuitkd.run.executors import ray_cluster

                # One cluster for every arm, joined and checked against each arm's resources before any job.
                stack.enter_context(ray_cluster(cfg))
        # One arm runs into --out itself; several run into --out/<arm> beside their side-by-side summary and report.
        for arm, cfg in cfgs.items():
            arm_out = out if len(cfgs) == 1 else out / arm
            t_arm = time.perf_counter()
            _run_one(cfg, arm_out, analyse=not args.no_analysis)
            _log(f"arm {arm or cfg.name}: {time.perf_counter() - t_arm:.0f}s")
    if len(cfgs) > 1:
        from circuitkd.run.arms import write_arms_summary

        _log(f"summary: {write_arms_summary(out)}")
        if not args.no_analysis:
            from circuitkd.run.report import write_report

            _log(f"report: {write_report(out)}")
    _log(f"done in {time.perf_counter() - t0:.0f}s")
    print(out / ("summary.md" if args.no_analysis else "report.html"))
    return 0


def _seed_list(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` or ``"0-4"`` -> seeds; anything else is refused with the text it got."""
    try:
        if "-" in text.strip("-") and "," not in text:
            lo, hi = (int(x) for x in text.split("-"))
            seeds = tuple(range(lo, hi + 1))
        else:
            seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be like 0,1,2 or 0-4, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def _targets_cmd(args: argparse.Namespace) -> int:
    from circuitkd.run.plan import arm_config_path, load_config
    from circuitkd.run.targets import TARGETS_MD, check_targets

    if args.config is not None and args.arm is not None:
        raise CircuitKDError(f"--arm {args.arm} picks a shipped config; --config {args.config} checks that config: "
                             "give one of them")
    cfg = load_config(args.config or arm_config_path(args.arm or "nli"), seeds=args.seeds, workers=args.workers,
                      device=args.device)
    result = check_targets(cfg, args.out, log=_log)
    print(Path(args.out) / TARGETS_MD)
    return 0 if result["targets_met"] else 1


def _run_one(cfg, out: Path, *, analyse: bool) -> None:
    """One config's grid, then (with ``analyse``) its analysis stage and report, into the run folder ``out``."""
    from circuitkd.run.tasks import load_task
    from circuitkd.run.runner import run_experiment

    with contextlib.ExitStack() as stack:
        if cfg.executor == "ray":
            from circuitkd.run.executors import ray_cluster

            stack.enter_context(ray_cluster(cfg))  # the caller's cluster, or one joined here before any job
        run_experiment(cfg, out)
        if analyse:
            from circuitkd.run.report import write_report
            from circuitkd.run.study import analyse_run

            analysis = cfg.analysis or {}
            analyse_run(out, log=_log, **analysis)
            from circuitkd.image_mechanisms import analyse_images, supports

            if supports(load_task(cfg)):
                analyse_images(out, n_pairs=analysis.get("n_pairs", 64), n_attention=analysis.get("n_attention", 256),
                               log=_log)
            report = write_report(out)
            _log(f"report: {report}")


def _train(args: argparse.Namespace) -> int:
    from circuitkd import ModelSpec, TrainCfg, evaluate, train_model

    task = _task_from_args(args)
    spec = ModelSpec.preset(args.preset, **_json_flag(args.spec, "--spec", {}))
    model = train_model(spec, task, debias=args.debias, seed=args.seed, device=args.device,
                        cfg=TrainCfg(steps=args.steps, batch_size=args.batch_size, lr=args.lr),
                        checkpoint=args.out)
    print(json.dumps(_headline(evaluate(model, task)), indent=1))
    _log(f"checkpoint: {args.out}")
    return 0


def _distill(args: argparse.Namespace) -> int:
    from circuitkd import ModelSpec, TrainCfg, distill, evaluate

    teacher = _load(args.teacher, args)
    task = _task_from_args(args, Path(args.teacher))
    spec = ModelSpec.preset(args.preset, **_json_flag(args.spec, "--spec", {}))
    via = [ModelSpec.preset(p.strip()) for p in args.via.split(",")] if args.via else []
    attention = None
    if args.attention_transfer is not None or args.attention_circuit is not None:
        attention = {"coef": 1.0 if args.attention_transfer is None else args.attention_transfer,
                     "positions": args.attention_positions, "circuit": args.attention_circuit}
    student = distill(teacher, spec, task, temperature=args.temperature, alpha=args.alpha, debias=args.debias,
                      init_from_teacher=args.init_from_teacher, augment=args.augment, via=via, seed=args.seed,
                      attention_transfer=attention,
                      cfg=TrainCfg(steps=args.steps, batch_size=args.batch_size, lr=args.lr), device=args.device,
                      checkpoint=args.out)
    print(json.dumps(_headline(evaluate(student, task)), indent=1))
    _log(f"checkpoint: {args.out}")
    return 0


def _headline(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k != "per_group"}


def _evaluate(args: argparse.Namespace) -> int:
    from circuitkd import evaluate

    scores = evaluate(_load(args.checkpoint, args), _task_from_args(args, Path(args.checkpoint)))
    print(json.dumps(scores if args.all else _headline(scores), indent=1))
    return 0


def _pairs(args: argparse.Namespace, task):
    return task.shortcut_pairs(args.n, bias=args.bias, seed=args.seed)


def _patch(args: argparse.Namespace) -> int:
    from circuitkd.patching import patch_result

    model = _load(args.checkpoint, args)
    task = _task_from_args(args, Path(args.checkpoint))
    res = patch_result(model, _pairs(args, task), site=args.site, direction=args.direction, normalise=not args.raw)
    values = res.values
    flat = values.flatten()
    order = flat.abs().argsort(descending=True)[: args.top]
    _log(f"{args.site} patching ({args.direction}, {res.method}): metric clean {res.clean:+.3f}, "
         f"corrupt {res.corrupt:+.3f}; axes {res.axes}")
    import torch

    for i in order.tolist():
        idx = [int(j) for j in torch.unravel_index(torch.tensor(i), values.shape)]
        print(f"{'.'.join(map(str, idx)):>10}  {float(flat[i]):+.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"axes": list(res.axes), "values": values.tolist(),
                                              "clean": res.clean, "corrupt": res.corrupt, "site": args.site}))
    return 0


def _diff(args: argparse.Namespace) -> int:
    from circuitkd.attention import diff_attention

    teacher, student = _load(args.teacher, args), _load(args.student, args)
    task = _task_from_args(args, Path(args.teacher))
    diff = diff_attention(teacher, student, task, split=args.split, n=args.n, matching=args.matching)
    print("\n".join(diff.summary()))
    if args.out:
        diff.to_json(args.out)
    return 0


_DEFAULT_TOP_K = 20


def _discover(args: argparse.Namespace) -> int:
    from circuitkd.circuits import discover

    model = _load(args.checkpoint, args)
    task = _task_from_args(args, Path(args.checkpoint))
    top_k = args.top_k
    if top_k is None:
        from circuitkd.circuits import build_graph

        graph = build_graph(model)
        n_edges = int(graph.valid.sum()) if graph.level == "edge" else graph.n_sources
        top_k = min(_DEFAULT_TOP_K, n_edges)
        if top_k < _DEFAULT_TOP_K:
            _log(f"note: --top-k defaults to {_DEFAULT_TOP_K}, but this model's graph has {n_edges} edges: "
                 f"keeping all {top_k}")
    circuit = discover(model, _pairs(args, task), method=args.method, top_k=top_k)
    for edge, score in circuit.top_edges(top_k):
        print(f"{str(edge):>24}  {score:+.4f}")
    if args.out:
        circuit.to_json(args.out)
        _log(f"circuit: {args.out}")
    return 0


def _analyse(args: argparse.Namespace) -> int:
    from circuitkd.run.study import analyse_run

    analyse_run(args.run, n_pairs=args.n, circuit_method=args.method, top_k=args.top_k, log=_log)
    print(Path(args.run) / "analysis" / "analysis.json")
    return 0


def _report(args: argparse.Namespace) -> int:
    from circuitkd.run.report import write_report

    print(write_report(args.run, out=args.out))
    return 0


def _figures(args: argparse.Namespace) -> int:
    from circuitkd.run.figures import FIGURES, build, save

    run = Path(args.run)
    if not (run / "results.json").is_file():
        raise CircuitKDError(f"{run} is not a finished run folder (no results.json): "
                             f"run `circuitkd run --out {run}` first")
    names = args.only.split(",") if args.only else list(FIGURES)
    written = 0
    for name in names:
        try:
            fig = build(name, args.run, pair=args.pair)
        except CircuitKDError as exc:
            if args.only:
                raise
            _log(f"skipped {name}: {exc}")
            continue
        print(save(fig, Path(args.out) / f"{name}.{args.format}"))
        written += 1
    if not written:
        raise CircuitKDError(f"no figure could be built from {run} (see the skipped figures above)")
    return 0


# ------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="circuitkd", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, func, description: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description or help_text)
        p.set_defaults(func=func)
        return p

    run = command("run", "the whole study: train, evaluate, analyse, report", _run,
                  "Train teachers (plain and debiased) and their students, evaluate them, analyse the "
                  "teacher/student pairs that matter, and write a run folder with results, summary.md and "
                  "report.html. Re-running with the same --out resumes an interrupted run.")
    run.add_argument("--config", help="experiment config (.json, .toml or .yaml; default: the shipped arms' configs)")
    run.add_argument("--arm", choices=("nli", "vision", "all"),
                     help="the study's arm: 'nli' (synthetic NLI, configs/default.json), 'vision' (shortcut MNIST on "
                          "ViTs, configs/vision.json) or 'all' (default: both, into OUT/nli and OUT/vision with a "
                          "side-by-side summary and report in OUT)")
    run.add_argument("--quick", action="store_true", help="smoke-run preset: one seed, few steps, small task")
    run.add_argument("--out", help="run folder (default: runs/<name>-<timestamp>)")
    run.add_argument("--workers", type=_COUNT, help="parallel training processes (overrides the config)")
    run.add_argument("--device", help="'auto', 'cpu' or 'cuda' (overrides the config)")
    run.add_argument("--executor", choices=("local", "ray"),
                     help="where jobs run: 'local' processes (default) or 'ray' tasks (pip install -e \".[ray]\")")
    run.add_argument("--ray-address", help="Ray cluster to join: 'auto' or HOST:PORT (default: RAY_ADDRESS, else a "
                                           "new local Ray)")
    run.add_argument("--cpus-per-job", type=_COUNT, help="CPUs (torch threads) per Ray job (overrides the config)")
    run.add_argument("--gpus-per-job", type=_number(float, 0),
                     help="GPUs per Ray job; above 1 the job trains under torchrun DDP (overrides the config)")
    run.add_argument("--no-analysis", action="store_true", help="stop after training and evaluation")

    tg = command("targets", "check a config's accuracy targets seed by seed, training only the models they name",
                 _targets_cmd,
                 "Train (or find, in a folder of the same config) the two controls, the plain teacher and each "
                 "debiased teacher for the seeds given, and check every accuracy target on the mean over seeds and "
                 "on each seed alone; writes OUT/targets.md and OUT/targets.json. Exit status 1 when a target is "
                 "missed on the mean.")
    tg.add_argument("--config", help="experiment config (default: the arm's shipped config)")
    tg.add_argument("--arm", choices=("nli", "vision"), help="the study's arm whose config to check (default: nli)")
    tg.add_argument("--seeds", required=True, type=_seed_list, help="seeds, e.g. 0,1,2,3,4 or 0-4")
    tg.add_argument("--out", required=True, help="folder for the models and targets.md: new, or a run folder of the "
                                                 "same config whatever its seeds (its models are reused)")
    tg.add_argument("--workers", type=_COUNT, help="parallel training processes (overrides the config)")
    tg.add_argument("--device", help="'auto', 'cpu' or 'cuda' (overrides the config)")

    def training(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="teacher", help="model size preset (teacher, student, assistant, tiny, ...)")
        p.add_argument("--spec", help="JSON of ModelSpec fields overriding the preset, e.g. '{\"d_model\": 64}'")
        p.add_argument("--debias", default="none", help="debiasing method (reweight, poe, learned_mixin_h, focal, "
                                                       "confreg, group_dro, jtt; optionally method:bias)")
        p.add_argument("--steps", type=_COUNT, default=300)
        p.add_argument("--batch-size", type=_COUNT, default=64)
        p.add_argument("--lr", type=_POSITIVE, default=1e-3)
        p.add_argument("--seed", type=_SEED, default=0)
        p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
        p.add_argument("--out", required=True, help="checkpoint folder to write (an existing one is loaded, "
                                                    "an interrupted one resumed)")
        _add_task(p)

    training(command("train", "train one model (plainly or with a debiasing method)", _train))
    d = command("distill", "distil a checkpoint into a student (KD, debiased KD, the three fixes)", _distill)
    d.add_argument("teacher", help="teacher checkpoint folder")
    training(d)
    d.set_defaults(preset="student")
    d.add_argument("--temperature", type=_POSITIVE, default=2.0)
    d.add_argument("--alpha", type=_number(float, 0, hi=1), default=0.5, help="weight of the label loss (0 = pure KD)")
    d.add_argument("--init-from-teacher", action="store_true", help="fix 3: initialise from every other teacher layer")
    d.add_argument("--augment", type=_COUNT, help="fix 1: add this many generated bias-conflicting examples")
    d.add_argument("--via", help="fix 2: comma-separated presets of intermediate assistants")
    d.add_argument("--attention-transfer", type=_number(float, 0), metavar="COEF",
                   help="fix 4: add COEF x the attention KL of depth-matched student/teacher heads")
    d.add_argument("--attention-positions", choices=("all", "read"), default="all",
                   help="attention-transfer rows: every real token (default) or the read-out position")
    d.add_argument("--attention-circuit", type=_COUNT, metavar="K",
                   help="fix 4, circuit-guided: transfer only the heads on the teacher's top-K EAP-IG edges")

    e = command("evaluate", "ID / OOD / per-bias / worst-group accuracy of a checkpoint", _evaluate)
    e.add_argument("checkpoint")
    e.add_argument("--all", action="store_true", help="include per-group accuracies")
    e.add_argument("--device")
    _add_task(e)

    def pairs(p: argparse.ArgumentParser) -> None:
        p.add_argument("--n", type=_COUNT, default=128, help="shortcut-conflict pairs to use")
        p.add_argument("--bias", help="flip only this shortcut (default: any)")
        p.add_argument("--seed", type=_SEED, default=0)
        p.add_argument("--device")
        _add_task(p)

    pa = command("patch", "activation patching of the shortcut contrast in one model", _patch)
    pa.add_argument("checkpoint")
    pa.add_argument("--site", default="head", help="head, head_pos, resid, attn_out, mlp_out, q, k, v, pattern, ...")
    pa.add_argument("--direction", default="denoise", choices=["denoise", "noise"])
    pa.add_argument("--raw", action="store_true", help="raw metric instead of the normalised recovery")
    pa.add_argument("--top", type=_COUNT, default=10, help="how many of the largest effects to print")
    pa.add_argument("--out", help="write every effect as JSON")
    pairs(pa)

    di = command("diff", "teacher vs student attention: shortcut heads, head matching, CKA", _diff)
    di.add_argument("teacher")
    di.add_argument("student")
    di.add_argument("--split", default="ood_test")
    di.add_argument("--n", type=_COUNT, default=512)
    di.add_argument("--matching", default="hungarian", choices=["hungarian", "greedy"])
    di.add_argument("--out", help="write every number as JSON")
    di.add_argument("--device")
    _add_task(di)

    dc = command("discover", "circuit discovery (exact, eap, eap-ig, acdc) on the shortcut contrast", _discover)
    dc.add_argument("checkpoint")
    dc.add_argument("--method", default="eap-ig", choices=["exact", "eap", "eap-ig", "acdc"])
    dc.add_argument("--top-k", type=_COUNT, help="edges to keep (default: 20, at most the graph's size)")
    dc.add_argument("--out", help="write the circuit as JSON")
    pairs(dc)

    an = command("analyse", "run the analysis stage on a finished run folder", _analyse)
    an.add_argument("run")
    an.add_argument("--n", type=_COUNT, default=96, help="shortcut-conflict pairs")
    an.add_argument("--method", default="eap-ig", choices=["exact", "eap", "eap-ig", "acdc"])
    an.add_argument("--top-k", type=_COUNT, default=20)

    rp = command("report", "write report.html for a run folder", _report)
    rp.add_argument("run")
    rp.add_argument("--out", help="where to write it (default: RUN/report.html)")

    fg = command("figures", "write the study's figures for a run folder", _figures)
    fg.add_argument("run")
    fg.add_argument("--out", default="figures")
    fg.add_argument("--only", help="comma-separated figure names (default: all)")
    fg.add_argument("--pair", help="teacher/student comparison for the analysis figures (default: plain)")
    fg.add_argument("--format", default="png", choices=["png", "svg", "pdf", "html"])
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CircuitKDError as exc:
        print(f"circuitkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("circuitkd: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
