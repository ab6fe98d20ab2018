"""The command line: each subcommand on tiny checkpoints, help text, one-line errors."""
import json

import pytest

from circuitkd.cli import build_parser, main

TASK_ARGS = json.dumps({"seed": 0, "n_train": 300, "n_id": 100, "n_ood": 100})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    assert main(["train", "--preset", "tiny", "--steps", "5", "--task-args", TASK_ARGS,
                 "--out", str(root / "teacher")]) == 0
    assert main(["distill", str(root / "teacher"), "--preset", "tiny", "--steps", "5", "--alpha", "0",
                 "--out", str(root / "student")]) == 0
    return root


def test_help_explains_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for name in ("run", "train", "distill", "evaluate", "patch", "diff", "discover", "analyse", "report", "figures"):
        assert name in text
    sub = build_parser()._subparsers._group_actions[0].choices
    assert all(p.description for p in sub.values())


def test_train_then_evaluate_reads_the_task_from_the_checkpoint(checkpoints, capsys):
    assert main(["evaluate", str(checkpoints / "student")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert {"id_acc", "ood_acc", "worst_group_acc", "per_bias"} <= set(scores)
    assert scores["n"] == {"id_test": 100, "ood_test": 100}  # the checkpoint's own task, not the default size


def test_distill_with_attention_transfer(checkpoints, tmp_path):
    out = tmp_path / "at"
    assert main(["distill", str(checkpoints / "teacher"), "--preset", "tiny", "--steps", "3", "--alpha", "0",
                 "--attention-transfer", "0.5", "--attention-positions", "read", "--attention-circuit", "8",
                 "--out", str(out)]) == 0
    at = json.loads((out / "config.json").read_text())["kd"]["attention_transfer"]
    assert at["coef"] == 0.5 and at["positions"] == "read" and at["circuit"]["top_k"] == 8


def test_patch_diff_discover_on_checkpoints(checkpoints, capsys, tmp_path):
    assert main(["patch", str(checkpoints / "student"), "--n", "16", "--out", str(tmp_path / "p.json")]) == 0
    assert json.loads((tmp_path / "p.json").read_text())["site"] == "head"
    assert main(["diff", str(checkpoints / "teacher"), str(checkpoints / "student"), "--n", "32"]) == 0
    assert "top shortcut heads" in capsys.readouterr().out
    assert main(["discover", str(checkpoints / "student"), "--n", "8", "--method", "eap", "--top-k", "3",
                 "--out", str(tmp_path / "c.json")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3
    from circuitkd.circuits import Circuit

    assert Circuit.from_json(tmp_path / "c.json").scores.numel() > 0


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "/nonexistent/ckpt"], "checkpoint not found"),
    (["train", "--preset", "huge", "--out", "x"], "unknown preset 'huge'"),
    (["train", "--task", "imagenet", "--out", "x"], "unknown task 'imagenet'"),
    (["report", "/nonexistent/run"], "not a finished run folder"),
    (["run", "--config", "/nonexistent/cfg.toml"], "config file not found"),
])
def test_bad_input_is_a_one_line_error_and_a_nonzero_exit(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("circuitkd: error:") and message in err and "\n" not in err


def test_toml_and_yaml_configs(tmp_path):
    from circuitkd.run.plan import load_config

    (tmp_path / "c.toml").write_text('name = "mine"\nmethods = ["poe", "focal"]\nseeds = [0, 1, 2]\n')
    (tmp_path / "c.yaml").write_text("name: mine\nmethods: [poe]\nteacher_steps: 10\n")
    toml_cfg, yaml_cfg = load_config(tmp_path / "c.toml"), load_config(tmp_path / "c.yaml")
    assert toml_cfg.methods == ("poe", "focal") and toml_cfg.seeds == (0, 1, 2)
    assert yaml_cfg.teacher_steps == 10
    (tmp_path / "bad.toml").write_text("methods = [")
    from circuitkd.errors import CircuitKDError

    with pytest.raises(CircuitKDError, match="cannot parse config file"):
        load_config(tmp_path / "bad.toml")


@pytest.mark.parametrize("argv, message", [
    (["train", "--task-args", "{bad", "--out", "x"], r"--task-args is not valid JSON"),
    (["train", "--task-args", "[1]", "--out", "x"], r"--task-args must be a JSON object"),
    (["train", "--spec", '{"bogus":1}', "--out", "x"], r"unknown ModelSpec field\(s\) \['bogus'\]"),
    (["train", "--spec", '{"d_model": "wide"}', "--out", "x"], r"ModelSpec.d_model must be int, got 'wide'"),
    (["train", "--seed", "-1", "--out", "x"], r"argument --seed: must be >= 0, got -1"),
    (["train", "--lr", "-1", "--out", "x"], r"argument --lr: must be > 0, got -1"),
    (["train", "--lr", "nan", "--out", "x"], r"argument --lr: must be > 0, got nan"),
    (["train", "--steps", "thirty", "--out", "x"], r"argument --steps: expected an integer, got 'thirty'"),
    (["distill", "t", "--alpha", "2", "--out", "x"], r"argument --alpha: must be >= 0 and <= 1, got 2"),
    (["discover", "c", "--top-k", "0"], r"argument --top-k: must be >= 1, got 0"),
    (["distill", "t", "--attention-transfer", "-1", "--out", "x"], r"argument --attention-transfer: must be >= 0, got -1"),
    (["distill", "t", "--attention-circuit", "0", "--out", "x"], r"argument --attention-circuit: must be >= 1, got 0"),
    (["run", "--workers", "0"], r"argument --workers: must be >= 1, got 0"),
])
def test_bad_flag_values_are_circuitkd_errors_with_exit_2(argv, message, capsys):
    import re

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals exit from inside parse_args
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("circuitkd: error: ") and re.search(message, err[-1]), err
    assert not any("Traceback" in line for line in err)


def test_figures_on_a_folder_with_no_run_exits_2(tmp_path, capsys):
    assert main(["figures", str(tmp_path), "--out", str(tmp_path / "figs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"circuitkd: error: {tmp_path} is not a finished run folder (no results.json): " \
                  f"run `circuitkd run --out {tmp_path}` first"
    assert not (tmp_path / "figs").exists()


def test_discover_default_top_k_is_clipped_to_the_graph(checkpoints, capsys):
    # the tiny student has 1 layer of 2 heads: fewer edges than the default 20
    assert main(["discover", str(checkpoints / "student"), "--n", "8", "--method", "eap"]) == 0
    out, err = capsys.readouterr()
    assert "note: --top-k defaults to 20, but this model's graph has" in err
    n = int(err.split("graph has ")[1].split()[0])
    assert n < 20 and len(out.strip().splitlines()) == n
