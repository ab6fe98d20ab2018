"""tools/mutation.py stays runnable: its module groups name files and tests that exist, pyproject's
[tool.mutmut] mutates what the groups do, docs/testing.md's commands parse, and the sample is fixed."""
import importlib.util
import re
import shlex
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("circuitkd_mutation_tool", ROOT / "tools" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_group_mutates_existing_modules_and_runs_existing_tests():
    from fnmatch import fnmatch

    tool = _tool()
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "circuitkd").rglob("*.py")]
    for group, (patterns, tests) in tool.GROUPS.items():
        for pattern in patterns:
            assert any(fnmatch(s, pattern) for s in sources), f"{group}: {pattern} matches no module"
        missing = [t for t in tests if not (ROOT / t).exists()]
        assert not missing, f"{group}: no such tests {missing}"
    mutmut = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    assert sorted(mutmut["only_mutate"]) == sorted(p for patterns, _ in tool.GROUPS.values() for p in patterns)


def test_the_documented_commands_parse():
    tool = _tool()
    text = (ROOT / "docs" / "testing.md").read_text()
    blocks = re.findall(r"^```bash[ \t]*\n(.*?)^```", text, flags=re.M | re.S)
    commands = [shlex.split(line.split("#")[0]) for block in blocks for line in block.splitlines()
                if line.startswith("python tools/mutation.py")]
    assert commands, "docs/testing.md shows no tools/mutation.py command"
    for argv in commands:
        args = tool.build_parser().parse_args(argv[2:])
        assert set(args.groups) <= set(tool.GROUPS)
    assert {g for argv in commands for g in tool.build_parser().parse_args(argv[2:]).groups} == set(tool.GROUPS)


def test_the_sample_depends_on_names_and_seed_only():
    tool = _tool()
    names = [f"circuitkd.m.x_f__mutmut_{i}" for i in range(1, 200)]
    picked = tool.sample(names, 20, seed=0)
    assert len(picked) == 20 and set(picked) <= set(names)
    assert tool.sample(list(reversed(names)), 20, seed=0) == picked
    assert set(picked) <= set(tool.sample(names, 40, seed=0))  # a bigger sample keeps the smaller one
    assert tool.sample(names, 20, seed=1) != picked
    assert tool.sample(names, 0, seed=0) == sorted(names)
