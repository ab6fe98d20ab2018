"""Issue 16: configs are validated when they are built, before anything runs or is written."""
import math

import pytest

from circuitkd.config import DebiasCfg, ExperimentCfg, ModelSpec, TrainCfg
from circuitkd.errors import CircuitKDError
from circuitkd.run.plan import CONFIG_DIR, default_config, load_config


def test_shipped_configs_load():
    assert default_config().methods
    assert load_config(quick=True).analysis
    from circuitkd.run.plan import ARMS, arm_config_path

    # Every shipped config is an arm's config or its --quick overrides; each arm loads, with and without them.
    assert sorted(p.name for p in CONFIG_DIR.glob("*.json")) == sorted(name for pair in ARMS.values() for name in pair)
    for arm in ARMS:
        for quick in (False, True):
            cfg = load_config(arm_config_path(arm), quick=quick)
            backbones = {cfg.model_spec(role).backbone for role in ("teacher", "student", "assistant")}
            assert backbones == ({"vit"} if arm == "vision" else {"native"}), (arm, quick, backbones)


@pytest.mark.parametrize("changes, message", [
    ({"methods": ["poe", "bogus"]}, r"unknown debiasing method 'bogus' in ExperimentCfg.methods"),
    ({"methods": ["group_dro:overlap"]}, r"method 'group_dro' uses no bias-only model"),
    ({"teacher_steps": "thirty"}, r"ExperimentCfg.teacher_steps must be int, got 'thirty'"),
    ({"teacher_steps": 2.5}, r"ExperimentCfg.teacher_steps must be int, got 2.5"),
    ({"lr": float("nan")}, r"ExperimentCfg.lr must be float \(finite\), got nan"),
    ({"lr": -1.0}, r"ExperimentCfg.lr must be > 0, got -1.0"),
    ({"temperature": 0}, r"ExperimentCfg.temperature must be > 0, got 0"),
    ({"seeds": [0, -1]}, r"ExperimentCfg.seeds must be a list of ints each >= 0"),
    ({"alphas": [0.5, 2]}, r"ExperimentCfg.alphas must be a list of floats each in \[0, 1\]"),
    ({"fixes": ["augment", "shrink"]}, r"unknown fix\(es\) \['shrink'\]"),
    ({"task": "imagenet"}, r"unknown task 'imagenet'"),
    ({"task_args": {"n_train": 10, "bogus": 1}}, r"unknown task_args \(task 'synthetic_nli'\) key\(s\) \['bogus'\]"),
    ({"analysis": {"n_pairs": 8, "top_kk": 3}}, r"unknown analysis key\(s\) \['top_kk'\]"),
    ({"teacher": {"preset": "teacher", "bogus": 1}}, r"unknown ModelSpec field\(s\) \['bogus'\]"),
    ({"student": {"preset": "student", "d_model": "wide"}}, r"ModelSpec.d_model must be int, got 'wide'"),
    ({"debias": {"dro_eta": "x"}}, r"DebiasCfg.dro_eta must be float \(finite\), got 'x'"),
    ({"debias": {"bogus": 1}}, r"unknown DebiasCfg field\(s\) \['bogus'\]"),
    ({"device": "gpu7"}, r"ExperimentCfg.device must be 'auto' or a torch device"),
    ({"workers": True}, r"ExperimentCfg.workers must be int, got True"),
    ({"task_args": "seed=0"}, r"ExperimentCfg.task_args must be dict, got 'seed=0'"),
])
def test_bad_experiment_config_fails_at_load(changes, message, tmp_path):
    data = {**default_config().to_dict(), **changes}
    with pytest.raises(CircuitKDError, match=message):
        ExperimentCfg.from_dict(data)
    # the same through a config file and through load_config's overrides, before anything is written
    import json

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CircuitKDError, match=message):
        load_config(path)
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("cls, changes, message", [
    (TrainCfg, {"lr": float("nan")}, r"TrainCfg.lr must be float \(finite\), got nan"),
    (TrainCfg, {"lr": -1e-3}, r"TrainCfg.lr must be > 0"),
    (TrainCfg, {"steps": "thirty"}, r"TrainCfg.steps must be int"),
    (TrainCfg, {"weight_decay": -0.1}, r"TrainCfg.weight_decay must be >= 0"),
    (TrainCfg, {"seed": -1}, r"TrainCfg.seed must be >= 0"),
    (TrainCfg, {"progress": "yes"}, r"TrainCfg.progress must be bool"),
    (DebiasCfg, {"dro_eta": math.inf}, r"DebiasCfg.dro_eta must be float \(finite\)"),
    (DebiasCfg, {"unknown_steps": 0}, r"DebiasCfg.unknown_steps must be >= 1"),
    (ModelSpec, {"dropout": 1.5}, r"ModelSpec.dropout must be in \[0, 1\)"),
    (ModelSpec, {"n_classes": 0}, r"ModelSpec.n_classes must be >= 1"),
    (ModelSpec, {"bogus": 1}, r"unknown ModelSpec field\(s\) \['bogus'\]"),
    (ModelSpec, {"pretrained": 3}, r"ModelSpec.pretrained must be str or null, got 3"),
])
def test_bad_field_values_fail_when_built(cls, changes, message):
    with pytest.raises(CircuitKDError, match=message):
        cls.from_dict(changes)


def test_preset_refuses_unknown_overrides():
    with pytest.raises(CircuitKDError, match=r"unknown ModelSpec field\(s\) \['bogus'\]"):
        ModelSpec.preset("tiny", bogus=1)

