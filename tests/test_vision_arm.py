"""The image arm of the study: `circuitkd run --arm vision --quick` end to end (grid, analysis, image
mechanisms, report with attention pictures), both arms side by side, a Waterbirds-shaped config on a
pretrained ViT and a local image folder, and bad input refused before anything is trained."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from circuitkd.cli import main
from circuitkd.errors import CircuitKDError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision") / "run"
    assert main(["run", "--arm", "vision", "--quick", "--out", str(out), "--workers", "1", "--device", "cpu"]) == 0
    return out


def test_vision_arm_runs_the_same_study(vision_run):
    results = json.loads((vision_run / "results.json").read_text())
    cfg = results["config"]
    assert cfg["task"] == "shortcut_mnist" and cfg["name"] == "vision-quick"
    rows = results["results"]
    # The same grid as the NLI arm: teachers, students alone, KD at each alpha, debiased KD, fixes, controls.
    assert {r["variant"] for r in rows} == {"teacher", "alone", "kd", "debiased_kd", "fix", "control"}
    assert all(r["n_layers"] in (1, 2) for r in rows)
    summary = results["summary"]
    assert {f["id"] for f in summary["findings"]} >= {"undermined_alpha0", "kd_adds_little", "varies_by_bias",
                                                      "fix_init", "mechanism"}
    assert {k for k in rows[0] if k.startswith("ood_acc[")} == {"ood_acc[color]", "ood_acc[cue]"}
    assert {t["name"] for t in summary["targets"]} >= {"control_teacher_id", "plain_teacher_ood_max"}


def test_image_mechanisms_and_pictures(vision_run):
    import plotly.io as pio

    image = json.loads((vision_run / "image_analysis" / "image_analysis.json").read_text())
    assert image["biases"] == ["color", "cue"]
    model = image["models"]["teacher-none-s0"]
    # Head patching over patch positions: [layer head pos] with CLS + a 4x4 grid of 7-pixel patches.
    assert torch.tensor(model["patching"]["color"]["head_pos"]).shape == (2, 2, 17)
    assert torch.tensor(model["attention"]["colored"]).shape == (2, 2)
    carriers = image["comparisons"][0]["carriers"]
    assert set(carriers) == {"teacher", "student"} and set(carriers["teacher"]) == {"color", "cue"}
    figs = sorted(p.name for p in (vision_run / "image_analysis" / "figures").glob("*.json"))
    assert "plain__attention_color.json" in figs and "plain__patching_cue.json" in figs
    fig = pio.read_json(str(vision_run / "image_analysis" / "figures" / "plain__attention_cue.json"))
    kinds = [t.type for t in fig.data]
    assert kinds.count("image") == 1 and kinds.count("heatmap") == 2 * 2 + 1 * 2  # every head of both models
    cue_map = next(t for t in fig.data if t.type == "heatmap")
    assert len(cue_map.z) == 4 and len(cue_map.z[0]) == 4
    html = (vision_run / "report.html").read_text()
    assert "Attention over the image" in html and "plain__attention_color" in html.replace("-", "_")
    assert "Which heads carry each shortcut" in html and "cue (flip lowers the logit difference by" in html


def test_arms_side_by_side(vision_run, quick_run, tmp_path):
    from circuitkd.run.arms import write_arms_summary
    from circuitkd.run.report import write_report

    out = tmp_path / "study"
    out.mkdir()
    os.symlink(quick_run, out / "nli")
    os.symlink(vision_run, out / "vision")
    md = write_arms_summary(out).read_text()
    assert "| target | nli | vision |" in md and "| finding | nli | vision |" in md
    assert "## Arm `nli` in full" in md and "## Arm `vision` in full" in md
    assert "`synthetic_nli`" in md and "`shortcut_mnist`" in md
    # each arm's cell names its own threshold (the arms' targets differ: plain teacher OOD <= 0.70 vs <= 0.50)
    plain_ood = next(line for line in md.splitlines() if line.startswith("| plain teacher OOD"))
    import json

    for arm, run_dir in (("nli", quick_run), ("vision", vision_run)):
        t = next(t for t in json.loads((Path(run_dir) / "results.json").read_text())["summary"]["targets"]
                 if t["name"] == "plain_teacher_ood_max")
        assert f"{t['value']:.3f} (≤ {t['target']:.2f})" in plain_ood, (arm, plain_ood)
    assert "## Which heads carry each shortcut (arm `vision`)" in md and "color (flip lowers" in md
    page = write_report(out).read_text()
    assert "id='arm-nli'" in page and "id='arm-vision'" in page
    # Two arms' comparisons of the same name keep apart: no element id appears twice.
    import re

    ids = re.findall(r"<(?:div|h\d)\b[^>]*\bid=['\"]([^'\"]+)['\"]", page)  # elements, not plotly.js's source
    assert len(ids) == len(set(ids))


def test_bad_image_input_is_refused_before_training(tmp_path):
    from circuitkd.run.plan import arm_config_path, load_config
    from circuitkd.run.runner import run_experiment

    cfg = load_config(arm_config_path("vision"), quick=True, workers=1, device="cpu")
    bad = cfg.replace(task_args={**cfg.task_args, "strength": 1.5})
    with pytest.raises(CircuitKDError, match=r"strength must be a number in \[0, 1\], got 1.5"):
        run_experiment(bad, tmp_path / "a", log=lambda *_: None)
    assert not (tmp_path / "a").exists()
    bad = cfg.replace(task_args={**cfg.task_args, "cue_at": [25, 0]})
    with pytest.raises(CircuitKDError, match=r"cue_at=\(25, 0\) does not fit a 28x28 image"):
        run_experiment(bad, tmp_path / "b", log=lambda *_: None)
    # A model with labels the task does not have, and images its patches do not tile: refused before
    # the folder is made, not when the job that builds that model starts (after others have trained).
    bad = cfg.replace(teacher={**cfg.teacher, "n_classes": 3})
    with pytest.raises(CircuitKDError, match=r"the teacher: task 'shortcut_mnist' has 2 labels but the model spec "
                                             r"declares n_classes=3"):
        run_experiment(bad, tmp_path / "c", log=lambda *_: None)
    bad = cfg.replace(task_args={**cfg.task_args, "image_size": 30})
    with pytest.raises(CircuitKDError, match=r"the teacher: image_size=30 is not divisible by patch_size=7"):
        run_experiment(bad, tmp_path / "d", log=lambda *_: None)
    assert not any((tmp_path / d).exists() for d in "bcd")
    assert main(["run", "--arm", "vision", "--config", "x.json"]) == 2


def _pretrained_vit(folder: Path, image_size: int) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=image_size, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=32, num_labels=2)
    ViTForImageClassification(cfg).save_pretrained(folder)
    return folder


def test_waterbirds_config_on_a_pretrained_vit_and_a_local_folder(tmp_path):
    """The README's Waterbirds config shape (task folder, pretrained ViT teacher, ViT students), run end to end
    on images this test writes; a pretrained ViT of another input size is refused before any training."""
    from tests.data.test_loaders import waterbirds_folder

    data = waterbirds_folder(tmp_path / "waterbirds")
    vit = _pretrained_vit(tmp_path / "vit", image_size=8)
    config = tmp_path / "waterbirds.toml"

    def write(vit_path: Path) -> None:
        config.write_text(f'''
name = "waterbirds-vit"
task = "waterbirds"
task_args = {{ path = "{data}", image_size = 8 }}
teacher = {{ backbone = "vit", pretrained = "{vit_path}" }}
student = {{ backbone = "vit", n_layers = 1, d_model = 16, n_heads = 2, patch_size = 4 }}
assistant = {{ backbone = "vit", n_layers = 1, d_model = 16, n_heads = 2, patch_size = 4 }}
methods = ["group_dro"]
fixes = ["iterative"]
seeds = [0]
teacher_steps = 3
student_steps = 3
batch_size = 4
lr = 1e-3
device = "cpu"
workers = 1
''')

    write(vit)
    out = tmp_path / "run"
    assert main(["run", "--config", str(config), "--out", str(out), "--no-analysis"]) == 0
    results = json.loads((out / "results.json").read_text())
    teacher = next(r for r in results["results"] if r["id"] == "teacher-none-s0")
    assert teacher["d_model"] == 16 and 0 <= teacher["ood_acc"] <= 1
    assert (out / "summary.md").is_file()

    wrong = _pretrained_vit(tmp_path / "vit16", image_size=16)
    write(wrong)
    with pytest.raises(CircuitKDError, match=r"the teacher \(pretrained ViT .*vit16'\) reads 3x16x16 images .* "
                                             r"task 'waterbirds' has 3x8x8 images"):
        from circuitkd.run.plan import load_config
        from circuitkd.run.runner import run_experiment

        run_experiment(load_config(config), tmp_path / "run2", log=lambda *_: None)
    assert not (tmp_path / "run2").exists()
