"""Mechanisms on images: which ViT heads carry each shortcut, over the picture's patches.

The analysis stage (:mod:`circuitkd.run.study`) compares teacher and student on any task: head
patching, attention diffing with head matching and CKA, circuits. On an image task the
shortcuts live at places in the picture (the coloured stroke, the cue patch), so this module
adds, per model of each teacher/student comparison and per bias type:

* **head patching over patch positions** (:func:`circuitkd.patching.patch`, sites ``head`` and
  ``head_pos``): on pairs that flip only that shortcut (:meth:`Task.shortcut_pairs` with
  ``bias=``), each head's clean output is patched into the flipped run, all positions at once
  and one patch position at a time. A head whose output restores logit(gold) − logit(shortcut's
  label) carries that shortcut; the per-position effects say from which patches (Heimersheim &
  Nanda 2024, "How to use and interpret activation patching", denoising);
* **attention mass from CLS onto the shortcut's patches** per head
  (:func:`circuitkd.attention.attention_stats`, token classes ``colored`` and ``cue``), and onto
  every stroke patch for reference;
* figures that show it on the picture: every head's CLS attention laid over one
  shortcut-conflicting image, and every head's patching effect per patch position.

Everything is written to ``<run>/image_analysis/`` (``image_analysis.json`` and
``figures/*.json``) atomically; :func:`circuitkd.run.report.run_parts` shows it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from jaxtyping import Float
from torch import Tensor

from circuitkd.errors import CircuitKDError

IMAGE_DIR = "image_analysis"
#: The pixel classes of each bias type's shortcut (shortcut_mnist and colored_mnist name them so).
SHORTCUT_CLASS = {"color": "colored", "cue": "cue"}


def supports(task) -> bool:
    """Whether ``task`` is an image task whose every bias type has a known shortcut pixel class."""
    return task.modality == "image" and all(b in SHORTCUT_CLASS for b in task.bias_types)


def cls_attention_maps(model, images: Float[Tensor, "batch channel height width"]
                       ) -> Float[Tensor, "batch layer head rows cols"]:
    """Attention from CLS to every patch, per head, laid out on the patch grid."""
    from circuitkd.engine import run
    from circuitkd.hooks import Site
    from circuitkd.hooks import n_layers
    from circuitkd.models.build import spec_of

    spec = spec_of(model)
    rows, cols = spec.image_size // spec.patch_size, spec.image_size // spec.patch_size
    sites = [Site(layer, "pattern") for layer in range(n_layers(model))]
    res = run(model, images, sites=sites, keep_logits=False, batch_size=len(images))
    pattern = torch.stack([res.acts[s] for s in sites], dim=1).float().cpu()  # [batch layer head dest src]
    return pattern[:, :, :, 0, 1:].reshape(*pattern.shape[:3], rows, cols)


def model_mechanisms(model, task, *, seed: int, n_pairs: int, n_attention: int,
                     batch_size: int) -> dict[str, Any]:
    """One model: per bias type, head and head × patch-position patching and CLS attention to its patches."""
    from circuitkd.attention import attention_stats
    from circuitkd.patching import patch_result

    stats = attention_stats(model, task, split="ood_test", n=n_attention, seed=seed)
    out: dict[str, Any] = {"attention": {}, "patching": {}}
    for cls in (*[SHORTCUT_CLASS[b] for b in task.bias_types if SHORTCUT_CLASS.get(b) in stats.from_read], "stroke"):
        if cls in stats.from_read:
            out["attention"][cls] = stats.from_read[cls].tolist()
    for bias in task.bias_types:
        pairs = task.shortcut_pairs(n_pairs, bias=bias, seed=seed)
        head = patch_result(model, pairs, site="head", normalise=False, batch_size=batch_size)
        pos = patch_result(model, pairs, site="head_pos", normalise=False, batch_size=batch_size)
        out["patching"][bias] = {"sensitivity": head.clean - head.corrupt, "clean": head.clean,
                                 "corrupt": head.corrupt, "head": (head.raw - head.corrupt).tolist(),
                                 "head_pos": (pos.raw - pos.corrupt).tolist()}
    return out


def carriers(result: dict[str, Any], bias: str, k: int = 2) -> list[dict[str, Any]]:
    """The ``k`` heads whose clean output restores most of the gold-vs-shortcut logit difference
    on pairs that flip ``bias`` (largest positive head-patching effect), with their CLS attention
    to the shortcut's patches."""
    effect = torch.tensor(result["patching"][bias]["head"])
    attention = result["attention"].get(SHORTCUT_CLASS.get(bias, ""))
    order = effect.flatten().argsort(descending=True)[:k].tolist()
    out = []
    for flat in order:
        layer, head = divmod(flat, effect.shape[1])
        out.append({"head": f"{layer}.{head}", "effect": float(effect[layer, head]),
                    "cls_attention": None if attention is None else float(attention[layer][head])})
    return out


def _describe(who: str, model_id: str, result: dict[str, Any], biases: tuple[str, ...]) -> str:
    parts = []
    for bias in biases:
        top = carriers(result, bias)
        sens = result["patching"][bias]["sensitivity"]
        heads = ", ".join(f"{c['head']} ({c['effect']:+.2f}" + (f", CLS→{SHORTCUT_CLASS[bias]} {c['cls_attention']:.2f}"
                                                                if c["cls_attention"] is not None else "") + ")"
                          for c in top)
        parts.append(f"{bias} (flip lowers the logit difference by {sens:.2f}) carried by {heads}")
    return f"{who} `{model_id}`: " + "; ".join(parts)


def _example(task, bias: str) -> tuple[int, Tensor]:
    """The first ood_test image whose only shortcut is ``bias``, against the label."""
    split = task.ood_test
    b = split.bias_labels[bias]
    others = [split.bias_labels[o] < 0 for o in task.bias_types if o != bias]
    keep = (b >= 0) & (b != split.labels)
    for o in others:
        keep = keep & o
    idx = torch.nonzero(keep).flatten()
    if not len(idx):
        raise CircuitKDError(f"ood_test holds no image whose only shortcut is {bias!r} against the label")
    i = int(idx[0])
    return i, split.inputs[i]


def analyse_images(run_dir: str | Path, *, n_pairs: int = 64, n_attention: int = 256, batch_size: int = 64,
                   seeds: Optional[list[int]] = None, device: Optional[str] = None,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """The image mechanisms of a finished run on an image task; writes ``<run>/image_analysis/``.

    For each seed, the plain teacher and each debiased teacher with its KD student (the
    comparisons of :func:`circuitkd.run.study.comparisons` other than the fixes): per model and bias
    type, head and head × patch patching, and CLS attention to the shortcut's patches. Figures
    come from the first seed.
    """
    from circuitkd.models import load_checkpoint
    from circuitkd.models.checkpoint import atomic_write_dir
    from circuitkd.run.study import comparisons, load_finished_run
    from circuitkd.viz import image_maps

    run_dir = Path(run_dir)
    results, cfg, task = load_finished_run(run_dir)
    if task.modality != "image":
        raise CircuitKDError(f"run {run_dir} is on the {task.modality} task {task.name!r}, not an image task")
    missing = [b for b in task.bias_types if b not in SHORTCUT_CLASS]
    if missing:
        raise CircuitKDError(f"task {task.name!r} has bias types {missing} with no known shortcut pixel class "
                             f"(known: {SHORTCUT_CLASS})")
    seeds = list(cfg.seeds) if seeds is None else list(seeds)
    t_start = time.perf_counter()
    per_model: dict[str, dict[str, Any]] = {}
    entries, lines, figures, captions = [], [], {}, {}
    examples = {bias: _example(task, bias) for bias in task.bias_types}
    for s in seeds:
        for cmp in comparisons(cfg, results["results"], seed=s):
            if "+" in cmp["name"]:
                continue  # the fixes' students: the study's analysis covers them
            loaded = {}
            for who in ("teacher", "student"):
                model_id = cmp[who]
                loaded[who] = load_checkpoint(run_dir / "models" / model_id, device=device)
                if model_id not in per_model:
                    t0 = time.perf_counter()
                    per_model[model_id] = model_mechanisms(loaded[who], task, seed=s, n_pairs=n_pairs,
                                                           n_attention=n_attention, batch_size=batch_size)
                    log(f"  {model_id}: image mechanisms in {time.perf_counter() - t0:.1f}s")
            entry = {"seed": s, **cmp,
                     "carriers": {who: {b: carriers(per_model[cmp[who]], b) for b in task.bias_types}
                                  for who in ("teacher", "student")}}
            entries.append(entry)
            lines.append(f"seed {s}, {cmp['what']}: "
                         + " — ".join(_describe(who, cmp[who], per_model[cmp[who]], task.bias_types)
                                      for who in ("teacher", "student")))
            if s != seeds[0]:
                continue
            for bias, (index, image) in examples.items():
                maps = {who: cls_attention_maps(loaded[who], image[None].to(_device(loaded[who])))[0]
                        for who in ("teacher", "student")}
                key = f"{cmp['name']}__attention_{bias}"
                figures[key] = image_maps.head_attention_grid(
                    image, maps["teacher"], maps["student"], teacher_name=cmp["teacher"], student_name=cmp["student"],
                    title=f"{cmp['what']}: CLS attention of every head on ood_test image {index} "
                          f"({bias} against the label)")
                captions[key] = f"{cmp['what']}: every head's attention from CLS over an image whose {bias} " \
                                f"shortcut points to the wrong label"
                key = f"{cmp['name']}__patching_{bias}"
                figures[key] = image_maps.patch_position_effects(
                    image, per_model[cmp["teacher"]]["patching"][bias]["head_pos"],
                    per_model[cmp["student"]]["patching"][bias]["head_pos"], teacher_name=cmp["teacher"],
                    student_name=cmp["student"],
                    title=f"{cmp['what']}: head patching per patch position, pairs flipping {bias}")
                captions[key] = f"{cmp['what']}: which heads, at which patches, restore the gold label when the " \
                                f"{bias} shortcut is flipped (head × patch-position patching)"
    analysis = {"run": str(run_dir), "task": task.name, "seeds": seeds, "n_pairs": n_pairs, "n_attention": n_attention,
                "biases": list(task.bias_types), "models": per_model, "comparisons": entries, "lines": lines,
                "captions": captions, "seconds": time.perf_counter() - t_start}

    def write(tmp: Path) -> None:
        (tmp / "figures").mkdir()
        for key, fig in figures.items():
            (tmp / "figures" / f"{key}.json").write_text(fig.to_json())
        (tmp / "image_analysis.json").write_text(json.dumps(analysis, indent=1))

    atomic_write_dir(run_dir / IMAGE_DIR, write)
    log(f"image mechanisms written to {run_dir / IMAGE_DIR} ({analysis['seconds']:.0f}s)")
    return analysis


def _device(model):
    from circuitkd.models.build import model_device

    return model_device(model)
