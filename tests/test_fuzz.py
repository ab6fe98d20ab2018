"""Issue 16, item 6: property-based fuzzing of circuitkd's entry points (hypothesis).

One property everywhere: the call returns a finite result of the documented shape, or raises
:class:`CircuitKDError` — nothing else (no raw IndexError/RuntimeError, no NaN result). On the
command line: exit code 0, or 2 with a last stderr line ``circuitkd: error: ...`` and no
traceback. Example counts are bounded (``settings(max_examples=...)``) so the whole file costs
well under a minute on two cores; a failure prints the shrunk input that reproduces it.
"""
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import circuitkd as ckd
from circuitkd import CircuitKDError, ModelSpec, PromptPairs, build_model
from circuitkd.patching import SITES

torch.set_num_threads(1)
N_LAYERS, N_HEADS, D_VOCAB, N_CTX, N_CLASSES = 1, 2, 20, 8, 3
FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model():
    spec = ModelSpec(backbone="native", n_layers=N_LAYERS, d_model=16, n_heads=N_HEADS, d_vocab=D_VOCAB,
                     n_ctx=N_CTX, n_classes=N_CLASSES)
    return build_model(spec, device="cpu")


# ----------------------------------------------------------------------------- strategies


@st.composite
def answers(draw, n: int):
    """Class ids, mostly valid; tensors only (the test run's jaxtyping checks enforce the annotations)."""
    kind = draw(st.sampled_from(["ids"] * 4 + ["out_of_range", "float", "bool", "wrong_length"]))
    ids = torch.tensor(draw(st.lists(st.integers(0, N_CLASSES - 1), min_size=n, max_size=n)), dtype=torch.long)
    if kind == "out_of_range" and n:
        ids[0] = N_CLASSES
    if kind == "float":
        return torch.tensor(draw(st.lists(st.floats(allow_nan=True, width=32), min_size=n, max_size=n)))
    if kind == "bool":
        return ids > 0
    if kind == "wrong_length":
        return torch.zeros(n + 1, dtype=torch.long)
    return ids


FAULTS = ["token_range", "answer_range", "answer_float", "answer_bool", "answer_length", "answer_int32",
          "corrupt_length", "uint8_tokens", "int32_tokens", "mask_shape", "mask_random", "position",
          "seq_too_long", "same_answers", "empty"]


@st.composite
def token_pairs_args(draw, max_n: int = 4):
    """Keyword arguments for PromptPairs over token ids: valid half the time, else one fault of :data:`FAULTS`."""
    fault = draw(st.sampled_from(["none"] * len(FAULTS) + FAULTS))
    n = 0 if fault == "empty" else draw(st.integers(1, max_n))
    seq = N_CTX + draw(st.integers(1, 3)) if fault == "seq_too_long" else draw(st.integers(1, N_CTX))
    ids = lambda hi, size: draw(st.lists(st.integers(0, hi - 1), min_size=size, max_size=size))  # noqa: E731
    clean = torch.tensor(ids(D_VOCAB, n * seq), dtype=torch.long).reshape(n, seq)
    corrupt = clean.clone()
    if n:
        corrupt[:, draw(st.integers(0, seq - 1))] = draw(st.integers(0, D_VOCAB - 1))
    clean_answer = torch.tensor(ids(N_CLASSES, n), dtype=torch.long)
    corrupt_answer = (clean_answer + draw(st.integers(1, N_CLASSES - 1))) % N_CLASSES
    mask, position = None, draw(st.sampled_from([0, 0, 0, -1]))
    cell = lambda t: (draw(st.integers(0, t.shape[0] - 1)), draw(st.integers(0, t.shape[1] - 1)))  # noqa: E731
    if fault == "token_range" and n:
        clean[cell(clean)] = draw(st.sampled_from([-1, D_VOCAB, D_VOCAB + 5]))
    elif fault == "answer_range" and n:
        clean_answer[draw(st.integers(0, n - 1))] = draw(st.sampled_from([-1, N_CLASSES, N_CLASSES + 4]))
    elif fault == "answer_float":
        floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
        clean_answer = torch.tensor(draw(st.lists(floats, min_size=n, max_size=n)), dtype=torch.float32)
    elif fault == "answer_bool":
        corrupt_answer = corrupt_answer > 0
    elif fault == "answer_length":
        corrupt_answer = torch.zeros(n + 1, dtype=torch.long)
    elif fault == "answer_int32":
        clean_answer = clean_answer.to(torch.int32)
    elif fault == "corrupt_length":
        corrupt = torch.ones(n, seq + 1, dtype=torch.long)
    elif fault == "uint8_tokens":
        clean, corrupt = clean.to(torch.uint8), corrupt.to(torch.uint8)
    elif fault == "int32_tokens":
        clean, corrupt = clean.to(torch.int32), corrupt.to(torch.int32)
    elif fault == "mask_shape":
        mask = torch.ones(n, seq + 1, dtype=torch.long)
    elif fault == "mask_random":
        mask = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=n * seq, max_size=n * seq))).reshape(n, seq)
    elif fault == "position":
        position = draw(st.sampled_from([seq, -seq - 1, seq - 1, 10**6]))
    elif fault == "same_answers":
        corrupt_answer = clean_answer.clone()
    event(f"fault: {fault}")
    return dict(clean=clean, corrupt=corrupt, clean_answer=clean_answer, corrupt_answer=corrupt_answer,
                attention_mask=mask, position=position)


@st.composite
def pixel_pairs_args(draw):
    n = draw(st.integers(0, 3))
    shape = (n, draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    size = math.prod(shape)
    floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
    clean = torch.tensor(draw(st.lists(floats, min_size=size, max_size=size)), dtype=torch.float32).reshape(shape)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bool]))
    return dict(clean=clean.to(dtype), corrupt=torch.zeros(shape, dtype=dtype), clean_answer=draw(answers(n)),
                corrupt_answer=draw(answers(n)))


def _pairs_or_none(kwargs):
    try:
        return PromptPairs(**kwargs)
    except CircuitKDError:
        event("pairs refused")
        return None


# ------------------------------------------------------------------------- PromptPairs


@settings(max_examples=150, **FUZZ)
@given(kwargs=st.one_of(token_pairs_args(), pixel_pairs_args()))
def test_fuzz_prompt_pairs_construction(kwargs):
    try:
        pairs = PromptPairs(**kwargs)
    except CircuitKDError:
        return
    n = kwargs["clean"].shape[0]
    assert len(pairs) == n and pairs.clean.shape == pairs.corrupt.shape
    for answer in (pairs.clean_answer, pairs.corrupt_answer):
        assert answer.dtype == torch.long and answer.shape == (n,) and (n == 0 or int(answer.min()) >= 0)
    assert len(pairs[0:1]) == min(n, 1)


# ------------------------------------------------------------------------------- patch

METRICS = st.sampled_from([None, "logit_diff", "prob_diff", "kl", "prob", "bogus"])


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


@settings(max_examples=40, **FUZZ)
@given(kwargs=token_pairs_args(), site=st.sampled_from([*SITES, "bogus"]), metric=METRICS,
       direction=st.sampled_from(["denoise", "noise", "sideways"]), normalise=st.booleans())
def test_fuzz_patch(model, kwargs, site, metric, direction, normalise):
    pairs = _pairs_or_none(kwargs)
    if pairs is None:
        return
    try:
        res = ckd.patch_result(model, pairs, site=site, metric=metric, direction=direction, normalise=normalise)
    except CircuitKDError:
        event("refused")
        return
    event("accepted")
    sizes = {"layer": N_LAYERS, "head": N_HEADS, "pos": pairs.clean.shape[1]}
    assert res.values.dim() == len(res.axes)
    for axis, size in zip(res.axes, res.values.shape):
        assert axis not in sizes or size == sizes[axis], (res.axes, tuple(res.values.shape))
    assert _finite(res.values) and _finite(res.raw) and math.isfinite(res.clean) and math.isfinite(res.corrupt)


# ---------------------------------------------------------------------------- discover


@settings(max_examples=25, **FUZZ)
@given(kwargs=token_pairs_args(max_n=3), method=st.sampled_from(["eap", "exact", "acdc", "eap-ig", "bogus"]),
       metric=METRICS, top_k=st.one_of(st.none(), st.integers(-1, 40)),
       level=st.sampled_from(["edge", "node", "bogus"]), ablation=st.sampled_from(["corrupt", "mean", "zero", "bogus"]))
def test_fuzz_discover(model, kwargs, method, metric, top_k, level, ablation):
    pairs = _pairs_or_none(kwargs)
    if pairs is None:
        return
    options = {"steps": 2} if method == "eap-ig" else {}
    try:
        circuit = ckd.discover(model, pairs, method=method, metric=metric, top_k=None if method == "acdc" else top_k,
                               level=level, ablation=ablation, **options)
    except CircuitKDError:
        event("refused")
        return
    event("accepted")
    assert tuple(circuit.scores.shape) == circuit.graph.shape and _finite(circuit.scores)
    if circuit.mask is not None:
        assert circuit.mask.shape == circuit.scores.shape and circuit.mask.dtype == torch.bool
    k = 5 if top_k is None or top_k < 1 else top_k
    top = circuit.top_edges(k)
    assert len(top) <= k and all(math.isfinite(score) for _, score in top)


# ---------------------------------------------------------------------------- evaluate


@settings(max_examples=15, **FUZZ)
@given(n_train=st.sampled_from([0, 30, 30, 31]), n_id=st.sampled_from([29, 30, 30, 33]),
       n_ood=st.sampled_from([0, 30, 30, 31]), strength=st.sampled_from([0.9, 0.9, 1.0, 0.0, 0.5, 1.5, float("nan")]),
       biases=st.one_of(st.just(["overlap", "negation", "cue"]),
                        st.lists(st.sampled_from(["overlap", "negation", "cue", "bogus"]), max_size=3)),
       batch_size=st.sampled_from([256, 7, 1, 0, -1]))
def test_fuzz_evaluate(n_train, n_id, n_ood, strength, biases, batch_size):
    try:
        task = ckd.data.synthetic_nli(seed=0, n_train=n_train, n_id=n_id, n_ood=n_ood, strength=strength,
                                      biases=tuple(biases))
        net = build_model(ModelSpec.preset("tiny"), task, device="cpu")
        scores = ckd.evaluate(net, task, batch_size=batch_size)
    except CircuitKDError:
        event("refused")
        return
    event("accepted")
    for key in ("id_acc", "ood_acc", "worst_group_acc"):
        assert 0.0 <= scores[key] <= 1.0, (key, scores[key])
    for bias, detail in scores["per_bias"].items():
        assert all(v is None or 0.0 <= v <= 1.0 for k, v in detail.items() if k.endswith("_acc")), (bias, detail)
    assert all(0.0 <= v <= 1.0 for v in scores["per_group"].values())


# ----------------------------------------------------------------------- config loader

JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)


@st.composite
def mutated_configs(draw):
    from circuitkd.run.plan import default_config

    data = json.loads(default_config().to_json())
    keys = sorted(data)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.one_of(st.sampled_from(keys), st.text(min_size=1, max_size=8)))
        if isinstance(data.get(key), dict) and draw(st.booleans()):
            inner = data[key]
            sub = draw(st.one_of(st.sampled_from(sorted(inner) or ["x"]), st.text(min_size=1, max_size=8)))
            inner[sub] = draw(JSON_VALUES)
        else:
            data[key] = draw(JSON_VALUES)
    return data


@settings(max_examples=100, **FUZZ)
@given(data=mutated_configs(), fmt=st.sampled_from(["dict", ".json", ".toml", ".yaml"]))
def test_fuzz_config_loader(data, fmt):
    from circuitkd.config import ExperimentCfg
    from circuitkd.run.plan import load_config

    try:
        if fmt == "dict":
            cfg = ExperimentCfg.from_dict(data)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"c{fmt}"
                path.write_text(_dump(data, fmt))
                cfg = load_config(path)
    except CircuitKDError:
        return
    assert ExperimentCfg.from_dict(json.loads(cfg.to_json())) == cfg


def _dump(data, fmt: str) -> str:
    if fmt == ".yaml":
        import yaml

        return yaml.safe_dump(data)
    if fmt == ".toml":
        return "\n".join(f"{json.dumps(str(k))} = {json.dumps(v)}" for k, v in data.items())  # TOML-ish: may not parse
    return json.dumps(data)


@settings(max_examples=60, **FUZZ)
@given(text=st.text(max_size=40), fmt=st.sampled_from([".json", ".toml", ".yaml", ".yml", ".txt"]))
def test_fuzz_config_file_text(text, fmt):
    from circuitkd.run.plan import load_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"c{fmt}"
        path.write_text(text)
        try:
            load_config(path)
        except CircuitKDError:
            pass


@settings(max_examples=60, **FUZZ)
@given(cls=st.sampled_from(["ModelSpec", "TrainCfg", "DebiasCfg"]),
       changes=st.dictionaries(st.one_of(st.sampled_from(["n_layers", "d_model", "n_heads", "lr", "steps", "seed",
                                                           "batch_size", "dropout", "backbone", "bias", "focal_gamma",
                                                           "dro_eta", "jtt_id_frac", "warmup_frac", "n_ctx"]),
                                         st.text(max_size=5)), JSON_VALUES, max_size=3))
def test_fuzz_config_dataclasses(cls, changes):
    import circuitkd.config as config

    try:
        obj = getattr(config, cls).from_dict(changes)
    except CircuitKDError:
        return
    assert getattr(config, cls).from_dict(obj.to_dict()) == obj


# ---------------------------------------------------------------------------------- CLI

class _Reached(Exception):
    """Raised in place of the expensive back-end (training, the study): the flags were accepted."""


def _flag_value():
    return st.one_of(st.sampled_from(["0", "1", "2", "-1", "0.5", "nan", "inf", "1e309", "", "x", "{}", "{bad",
                                      "[1]", '{"seed": 0}', '{"bogus": 1}', "tiny", "student", "poe", "bogus",
                                      "head", "cuda", "cpu"]),
                     st.text(max_size=6))


_FLAGS = {
    "run": ["--config", "--arm", "--quick", "--workers", "--device", "--executor", "--ray-address", "--cpus-per-job",
            "--gpus-per-job", "--no-analysis"],
    "train": ["--preset", "--spec", "--debias", "--steps", "--batch-size", "--lr", "--seed", "--device", "--task",
              "--task-args"],
    "distill": ["--preset", "--spec", "--debias", "--steps", "--lr", "--temperature", "--alpha", "--augment",
                "--via", "--attention-transfer", "--attention-circuit", "--attention-positions"],
    "evaluate": ["--all", "--device", "--task", "--task-args"],
    "patch": ["--site", "--direction", "--raw", "--top", "--n", "--bias", "--seed", "--task", "--task-args"],
    "discover": ["--method", "--top-k", "--n", "--bias", "--seed", "--task", "--task-args"],
    "diff": ["--split", "--n", "--matching", "--task"],
    "analyse": ["--n", "--method", "--top-k"],
    "report": ["--out"],
    "figures": ["--only", "--pair", "--format"],
}
_SWITCHES = {"--quick", "--no-analysis", "--all", "--raw"}


_JSON_VALUES = st.one_of(st.sampled_from(["{bad", "[1]", '{"bogus": 1}', '{"d_model": "wide"}', '{"seed": -1}',
                                          '{"n_train": 0}', '{"strength": 2}', "null", '"x"', "{}", '{"n_layers": 1e9}']),
                         st.text(max_size=6))


@st.composite
def argvs(draw):
    command = draw(st.sampled_from(sorted(_FLAGS)))
    argv = [command]
    for flag in draw(st.lists(st.sampled_from(_FLAGS[command] + ["--bogus"]), max_size=4, unique=True)):
        value = _JSON_VALUES if flag in ("--spec", "--task-args") else _flag_value()
        argv += [flag] if flag in _SWITCHES else [flag, draw(value)]
    return command, argv


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory):
    """A tiny checkpoint for the commands that read one, and the back-ends that would train replaced."""
    from circuitkd.cli import main

    root = tmp_path_factory.mktemp("fuzz-cli")
    task_args = json.dumps({"seed": 0, "n_train": 40, "n_id": 30, "n_ood": 30})
    assert main(["train", "--preset", "tiny", "--steps", "2", "--task-args", task_args, "--out", str(root / "m")]) == 0
    return root


@settings(max_examples=100, **FUZZ)
@given(case=argvs(), where=st.sampled_from(["model", "missing"]))
def test_fuzz_cli_arguments(cli_world, capsys, monkeypatch, case, where):
    import circuitkd.cli as cli

    def reached(*args, **kwargs):
        raise _Reached

    command, argv = case
    # Training and the study are what they are: once their flags are accepted, stop there.
    monkeypatch.setattr(ckd, "train_model", reached)
    monkeypatch.setattr(ckd, "distill", reached)
    monkeypatch.setattr(cli, "_run_one", reached)
    monkeypatch.setattr("circuitkd.run.study.analyse_run", reached)
    path = str(cli_world / "m") if where == "model" else str(cli_world / "missing")
    positional = {"distill": [path], "evaluate": [path], "patch": [path], "discover": [path],
                  "diff": [path, path], "analyse": [path], "report": [path], "figures": [path]}.get(command, [])
    argv = [argv[0], *positional, *argv[1:]]
    if command in ("train", "distill"):
        argv += ["--out", str(cli_world / "out"), "--task-args",
                 json.dumps({"seed": 0, "n_train": 30, "n_id": 30, "n_ood": 30})] if "--task-args" not in argv else \
                ["--out", str(cli_world / "out")]
    if command in ("patch", "discover", "diff") and "--n" not in argv:
        argv += ["--n", "4"]
    if command in ("run",) and "--out" not in argv:
        argv += ["--out", str(cli_world / "run")]
    if command == "report" and "--out" in argv:
        argv[argv.index("--out") + 1] = str(cli_world / "report.html")
    if command == "figures":
        argv += ["--out", str(cli_world / "figs")]
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except _Reached:
        event("accepted (reached the back-end)")
        return
    except SystemExit as exc:  # argparse's refusals exit from inside parse_args
        code = exc.code
    err = capsys.readouterr().err
    event(f"exit {code}")
    assert code in (0, 2), (argv, code, err)
    assert "Traceback" not in err, (argv, err)
    if code == 2:
        last = err.strip().splitlines()[-1]
        assert last.startswith("circuitkd: error: "), (argv, err)
