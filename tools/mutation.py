"""Mutation testing of the analysis and training core with mutmut 3, sized for two CPU cores.

A mutant is a small deliberate bug (``<`` for ``<=``, a dropped argument, ``+ 1`` for ``- 1``) put
into one function; the tests *kill* it when at least one of them fails. The share of killed mutants
says how much of a module's behaviour the tests pin down, and each survivor is either an
equivalent mutant (no input can tell it apart) or a missing test.

    python tools/mutation.py circuits distill debias patching attention --sample 80

Each group gets its own work folder (``.mutation/<group>/``: links to ``circuitkd/``, ``tests/`` and
``pyproject.toml``), so mutmut's ``mutants/`` copy, its per-function test map and its results stay
apart per group and the checkout's own files are never rewritten. Run it in a clone of the
repository when others edit the working tree. mutmut's settings come from ``[tool.mutmut]`` in
pyproject.toml; this script replaces only two of them per group: the files to mutate and the
tests that guard them (``GROUPS`` below). mutmut then runs, for each mutant, only the tests of
that selection that called the mutated function (its "stats" run records them), fastest first,
stopping at the first failure.

``--sample N`` keeps N mutants per group, chosen by a hash of the mutant's name and ``--seed`` (the
same N names on every run, whatever the order of generation), because a full run of every mutant
(about 4,000) does not fit an afternoon on two cores. ``--sample 0`` runs them all.

Written next to the work folder: ``<group>.json`` (counts and every survivor with its file, line
and diff) and a line per group on stdout::

    circuits: 71/80 killed (88.8%), 2 timeouts, 7 survived, 0 no tests  [412 s]

A survivor is retested after a new test is written with ``--only NAME [NAME ...]``.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# group -> (files to mutate, fnmatch patterns relative to the repository; tests that guard them).
# The tests are the default run's files that exercise the group (markers slow/ray/targets stay
# excluded, as in `pytest -q`); mutmut narrows them per function.
GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "circuits": (["circuitkd/circuits/*"],
                 ["tests/circuits", "tests/test_metrics.py", "tests/test_mutation_kills_circuits.py"]),
    "distill": (["circuitkd/train/distill.py"],
                ["tests/train/test_distill.py", "tests/train/test_distill_fixes_observed.py",
                 "tests/train/test_attention_transfer.py", "tests/train/test_resume_methods.py",
                 "tests/test_mutation_kills_train.py"]),
    "debias": (["circuitkd/train/debias.py"],
               ["tests/train/test_debias_losses.py", "tests/train/test_debias_ood.py",
                "tests/train/test_debias_tasks.py", "tests/train/test_bias_models.py",
                "tests/train/test_resume_methods.py", "tests/test_mutation_kills_train.py"]),
    "patching": (["circuitkd/patching*"],
                 ["tests/test_patching.py", "tests/test_patching_metric_references.py",
                  "tests/test_attribution_reference.py", "tests/test_path_patching_reference.py",
                  "tests/test_cross_model_reference.py", "tests/test_mutation_kills_patching.py"]),
    "attention": (["circuitkd/attention*"],
                  ["tests/test_attention.py", "tests/test_cross_model_reference.py",
                   "tests/viz/test_attention_figures.py", "tests/test_mutation_kills_attention.py"]),
}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def sample(names: list[str], n: int, seed: int) -> list[str]:
    """The ``n`` names with the smallest ``sha1(seed:name)``: a fixed sample, independent of order."""
    if n <= 0 or n >= len(names):
        return sorted(names)
    return sorted(sorted(names, key=lambda s: hashlib.sha1(f"{seed}:{s}".encode()).hexdigest())[:n])


def _workdir(base: Path, group: str) -> Path:
    work = base / group
    work.mkdir(parents=True, exist_ok=True)
    for name in ("circuitkd", "tests", "pyproject.toml"):
        link = work / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name)
    return work


def _configure(group: str, debug: bool = False):
    from mutmut import configuration

    cfg = configuration.config()
    cfg.debug = debug
    cfg.only_mutate, tests = GROUPS[group][0], GROUPS[group][1]
    cfg.pytest_add_cli_args_test_selection = [t for t in tests if (ROOT / t).exists()]
    return cfg


def _all_mutant_names() -> dict[str, int | None]:
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.utils.file_utils import walk_mutatable_files

    names: dict[str, int | None] = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        names.update(data.exit_code_by_key)
    return names


def _generate(max_children: int) -> None:
    from mutmut.__main__ import create_mutants
    from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir

    Path("mutants").mkdir(exist_ok=True)
    copy_src_dir()
    copy_also_copy_files()
    create_mutants(max_children)


def _source_line(diff: str, name: str) -> tuple[str, int]:
    """The mutated file and the line (in the original source) of a mutant's first changed line."""
    path = diff.splitlines()[0].removeprefix("--- ").strip()
    func = name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[1]
    func = func.split("ǁ")[-1] if "ǁ" in func else func.removeprefix("x_")
    tree = ast.parse((ROOT / path).read_text())
    start = next((min([n.lineno, *(d.lineno for d in n.decorator_list)]) for n in ast.walk(tree)
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func), 0)
    hunk = re.search(r"^@@ -(\d+)", diff, re.M)
    offset = int(hunk.group(1)) if hunk else 1
    body = diff[hunk.end():].split("\n")[1:] if hunk else []
    for line in body:
        if line.startswith("-") or line.startswith("+"):
            break
        offset += 1
    return path, start + offset - 1


def _import_time_calls(path: Path) -> set[str]:
    """Names of the functions a module calls while it is imported (module and class bodies)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.id if isinstance(func, ast.Name) else getattr(func, "attr", ""))
        for child in ast.iter_child_nodes(node):
            visit(child)

    for stmt in ast.parse(path.read_text()).body:
        visit(stmt)
    return names


def _fresh_process_exit_code(name: str, path: str, tests: list[str], base: Path) -> int:
    """Run ``tests`` in a new Python process on a copy of the package with the mutant written in.

    mutmut forks its workers from a process that imported circuitkd before any mutant was
    chosen, so a function that only runs at import (a registry built by a factory) keeps its
    original behaviour there and its mutants survive whatever the tests do. A fresh process
    imports the mutated module and sees the mutant.
    """
    import libcst as cst
    from mutmut.mutation.diff_apply import find_top_level_function_or_method, read_functions_from_index

    fresh = base / "fresh"
    if not fresh.exists():
        for folder in ("circuitkd", "tests"):
            shutil.copytree(ROOT / folder, fresh / folder, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", fresh / "pyproject.toml")
    func = name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[1]
    func = func.split("ǁ")[-1] if "ǁ" in func else func.removeprefix("x_")
    original = (ROOT / path).read_text()
    module = cst.parse_module(original)
    mutant = read_functions_from_index(name, path)[1].with_changes(name=cst.Name(func))
    (fresh / path).write_text(module.deep_replace(find_top_level_function_or_method(module, func), mutant).code)
    try:
        env = {**os.environ, "PYTHONPATH": str(fresh)}
        return subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "--rootdir=.", "-p", "no:cacheprovider",
                               "-o", "addopts=", "-m", "not slow and not ray and not targets", *tests],
                              cwd=fresh, env=env, capture_output=True).returncode
    finally:
        (fresh / path).write_text(original)


def _skip_clean_run_after_stats() -> None:
    """Skip mutmut's clean run of the selected tests when its stats run just passed them all.

    The stats run executes every test of the selection unmutated and stops the run if one
    fails, so a clean run straight after it repeats the same work: about ten minutes for the
    circuits group on two cores. When the stats are loaded from an earlier run instead, the
    clean run happens as usual.
    """
    import mutmut.__main__ as main
    from mutmut.workers import isolation

    ran = []
    collect, clean = main.run_stats_collection, isolation.ForkRunner.run_clean_tests

    def run_stats_collection(runner, tests=None):
        collect(runner, tests)
        if not tests:  # a full stats run (not just the tests new since the last one)
            ran.append(True)

    def run_clean_tests(self, tests):
        return 0 if ran else clean(self, tests)

    main.run_stats_collection = run_stats_collection
    isolation.ForkRunner.run_clean_tests = run_clean_tests


def run_group(group: str, n: int, seed: int, max_children: int, only: list[str], base: Path,
              debug: bool = False) -> dict:
    """Generate the group's mutants, run its sample (or ``only``), and summarise the results."""
    os.chdir(_workdir(base, group))
    sys.path.insert(0, str(Path("mutants").absolute()))
    _configure(group, debug)
    _skip_clean_run_after_stats()
    from mutmut.__main__ import _run
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    started = time.monotonic()
    shutil.rmtree(base / group / "fresh", ignore_errors=True)  # its copy of the tests is made anew
    _generate(max_children)
    # sys.path got mutants/ before the first generation made it: the import system cached "no such
    # folder" for it, and the stats run's conftest then failed on `import tests` in a fresh work folder
    importlib.invalidate_caches()
    every = _all_mutant_names()
    chosen = only or sample(list(every), n, seed)
    try:
        _run(chosen, max_children)
    except SystemExit as stop:  # mutmut exits on a failed stats or clean run: report it as such
        if stop.code not in (0, None):
            raise
    results = {k: v for k, v in _all_mutant_names().items() if k in set(sample(list(every), n, seed)) | set(only)}
    counts: dict[str, int] = {}
    survivors = []
    at_import = {}
    for name, code in sorted(results.items()):
        status = STATUS.get(code, "suspicious")
        path = get_diff_for_mutant(name).splitlines()[0].removeprefix("--- ").strip()
        func = name.rsplit("__mutmut_", 1)[0].rsplit(".", 1)[1].removeprefix("x_")
        if status == "survived" and func in at_import.setdefault(path, _import_time_calls(ROOT / path)):
            tests = [t for t in GROUPS[group][1] if (ROOT / t).exists()]
            code = _fresh_process_exit_code(name, path, tests, base / group)
            status = {0: "survived", 1: "killed in a fresh process"}.get(code, "suspicious")
            if code == 1:
                counts["killed"] = counts.get("killed", 0) + 1
        counts[status] = counts.get(status, 0) + 1
        if status in ("survived", "no tests", "suspicious"):
            diff = get_diff_for_mutant(name)
            path, line = _source_line(diff, name)
            survivors.append({"name": name, "status": status, "file": path, "line": line,
                              "diff": "\n".join(diff.splitlines()[2:])})
    summary = {"group": group, "files": GROUPS[group][0], "tests": GROUPS[group][1], "seed": seed,
               "sample": len(results), "generated": len(every), "counts": counts,
               "seconds": round(time.monotonic() - started), "survivors": survivors}
    (base / f"{group}.json").write_text(json.dumps(summary, indent=1))
    return summary


def recheck(group: str, tests: list[str], base: Path, import_time_only: bool = False) -> dict:
    """Run ``tests`` against each survivor of the group's last result, each in a fresh process.

    How new tests are shown to kill what survived: the mutant is written into a copy of the
    package and only ``tests`` run. The result (``<group>.after.json``, read again by the next
    recheck) keeps a record of which tests killed which survivors.
    """
    after_path = base / f"{group}.after.json"
    summary = json.loads((after_path if after_path.exists() else base / f"{group}.json").read_text())
    os.chdir(base / group)
    _configure(group)
    started = time.monotonic()
    shutil.rmtree(base / group / "fresh", ignore_errors=True)
    counts, survivors, killed = dict(summary["counts"]), [], []
    for survivor in summary["survivors"]:
        func = survivor["name"].rsplit("__mutmut_", 1)[0].rsplit(".", 1)[1].removeprefix("x_")
        if import_time_only and func not in _import_time_calls(ROOT / survivor["file"]):
            survivors.append(survivor)
            continue
        code = _fresh_process_exit_code(survivor["name"], survivor["file"], tests, base / group)
        if code == 1:
            counts[survivor["status"]] -= 1
            counts["killed"] = counts.get("killed", 0) + 1
            killed.append(survivor["name"])
        else:
            survivors.append(survivor)
    rounds = [*summary.get("rechecks", []), {"tests": tests, "import_time_only": import_time_only, "killed": killed,
                                               "seconds": round(time.monotonic() - started)}]
    after = {**summary, "counts": counts, "survivors": survivors, "rechecks": rounds}
    after_path.write_text(json.dumps(after, indent=1))
    return after


def markdown(groups: list[str], base: Path) -> str:
    """The scores before and after the rechecks, and the survivors left, as Markdown tables."""
    rows = ["| group | sampled / generated | killed before | timeouts | survived | killed after new tests |",
            "|---|---|---|---|---|---|"]
    left = ["| mutant | where | the mutated line |", "|---|---|---|"]
    for group in groups:
        if not (base / f"{group}.json").exists():
            continue
        before = json.loads((base / f"{group}.json").read_text())
        after_path = base / f"{group}.after.json"
        after = json.loads(after_path.read_text()) if after_path.exists() else before
        n, b, a = before["sample"], before["counts"].get("killed", 0), after["counts"].get("killed", 0)
        rows.append(f"| {group} | {n} / {before['generated']} | {b} ({100 * b / n:.0f}%) | "
                    f"{before['counts'].get('timeout', 0)} | {n - b - before['counts'].get('timeout', 0)} | "
                    f"{a} ({100 * a / n:.0f}%) |")
        for s in after["survivors"]:
            change = " ".join(l[1:].strip() for l in s["diff"].splitlines() if l[:1] == "+" and l[1:].strip())
            left.append(f"| `{s['name'].rsplit('.', 1)[1]}` | {s['file']}:{s['line']} | `{change[:110]}` |")
    return "\n".join(rows) + "\n\n" + "\n".join(left) + "\n"


def line(summary: dict) -> str:
    c = summary["counts"]
    killed, total = c.get("killed", 0), summary["sample"]
    return (f"{summary['group']}: {killed}/{total} killed ({100 * killed / max(total, 1):.1f}%), "
            f"{c.get('timeout', 0)} timeouts, {c.get('survived', 0)} survived, {c.get('no tests', 0)} no tests"
            f"  [{summary['seconds']} s]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("groups", nargs="+", choices=sorted(GROUPS))
    parser.add_argument("--sample", type=int, default=80, help="mutants per group (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--only", nargs="*", default=[], help="these mutant names only (one group)")
    parser.add_argument("--recheck", nargs="+", metavar="TEST",
                        help="run these tests against the survivors of the group's last run, a fresh process each")
    parser.add_argument("--import-time", action="store_true",
                        help="with --recheck: only survivors in functions that run at import")
    parser.add_argument("--markdown", action="store_true", help="print the groups' last results as Markdown")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".mutation")
    parser.add_argument("--debug", action="store_true", help="show mutmut's pytest commands and output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.only or args.recheck) and len(args.groups) != 1:
        parser.error("--only and --recheck take one group")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.markdown:
        print(markdown(args.groups, args.workdir.absolute()))
        return 0
    if len(args.groups) > 1:  # mutmut keeps its config and state in globals: one process per group
        for group in args.groups:
            command = [sys.executable, __file__, group, "--sample", str(args.sample), "--seed", str(args.seed),
                       "--max-children", str(args.max_children), "--workdir", str(args.workdir)]
            # mutmut's first stats run in a new work folder has been seen to fail with pytest's exit
            # code 4 and pass on the next try, with the mutants already generated: one retry.
            if subprocess.run(command, check=False).returncode != 0:
                subprocess.run(command, check=False)
        for group in args.groups:
            path = args.workdir / f"{group}.json"
            print(line(json.loads(path.read_text())) if path.exists() else f"{group}: no result")
        return 0
    args.workdir = args.workdir.absolute()
    if args.recheck:
        print(line(recheck(args.groups[0], args.recheck, args.workdir, args.import_time)), flush=True)
        return 0
    summary = run_group(args.groups[0], args.sample, args.seed, args.max_children, args.only, args.workdir, args.debug)
    print(line(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
