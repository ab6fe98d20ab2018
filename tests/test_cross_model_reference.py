"""Cross-model patching (teacher activations into a student) against plain TransformerLens hooks.

Both models run on the same (corrupt, when denoising) input; student layer ``i`` takes teacher
layer ``layer_map[i]``. For heads, the teacher head's own write ``z_t @ W_O_t`` replaces the student
head's ``z_s @ W_O_s`` (added to the student's attention output as their difference); for the
residual stream the teacher's residual replaces the student's. No circuitkd executor, metric or
hook code is used by the reference, and the student is not a copy of the teacher, so a patch that
did nothing could not pass.
"""
from __future__ import annotations

import pytest
import torch

from circuitkd import ModelSpec, build_model
from circuitkd.patching import cross_patch
from tests.hand_reference import logit_diff_at_cls, random_pairs

torch.set_num_threads(1)

N, P, V = 4, 8, 30
LAYER_MAP = [0, 2]


def _model(n_layers, seed):
    torch.manual_seed(seed)
    return build_model(ModelSpec(backbone="native", n_layers=n_layers, d_model=32, n_heads=2, d_vocab=V, n_ctx=P,
                                 n_classes=3, seed=seed), device="cpu")


@pytest.fixture(scope="module")
def models():
    return _model(4, 1), _model(2, 2)


def _pairs():
    return random_pairs(N, P, V, padding={0: 1})


_ld = logit_diff_at_cls


@pytest.mark.parametrize("site", ["head_pos", "resid"])
def test_cross_model_patching_equals_hand_hooks(models, site):
    teacher, student = models
    pairs = _pairs()
    x, mask = pairs.corrupt, pairs.attention_mask  # denoise: the base (and source) input is the corrupt one
    kind = "attn.hook_z" if site == "head_pos" else "hook_resid_pre"
    names = lambda L: [f"blocks.{l}.{kind}" for l in range(L)]  # noqa: E731
    with torch.no_grad():
        t_logits, t_cache = teacher.run_with_cache(x, attention_mask=mask, names_filter=lambda n: n in names(4))
        s_logits, s_cache = student.run_with_cache(x, attention_mask=mask, names_filter=lambda n: n in names(2))
    m_student, m_teacher = float(_ld(s_logits, pairs).mean()), float(_ld(t_logits, pairs).mean())
    H = student.cfg.n_heads
    cells = [(l, h, p) for l in range(2) for h in range(H) for p in range(P)] if site == "head_pos" \
        else [(l, None, p) for l in range(2) for p in range(P)]
    ref = torch.zeros(len(cells))
    for c, (l, h, p) in enumerate(cells):
        t = LAYER_MAP[l]
        if site == "head_pos":
            z_t, z_s = t_cache[f"blocks.{t}.attn.hook_z"], s_cache[f"blocks.{l}.attn.hook_z"]
            delta = z_t[:, p, h] @ teacher.blocks[t].attn.W_O[h] - z_s[:, p, h] @ student.blocks[l].attn.W_O[h]

            def fn(act, hook, p=p, delta=delta):
                act = act.clone()
                act[:, p] += delta
                return act
            hook_name = f"blocks.{l}.hook_attn_out"
        else:
            src = t_cache[f"blocks.{t}.hook_resid_pre"]

            def fn(act, hook, p=p, src=src):
                act = act.clone()
                act[:, p] = src[:, p]
                return act
            hook_name = f"blocks.{l}.hook_resid_pre"
        with torch.no_grad(), student.hooks(fwd_hooks=[(hook_name, fn)]):
            ref[c] = _ld(student(x, attention_mask=mask), pairs).mean()
    ref = ref.view(2, H, P) if site == "head_pos" else ref.view(2, P)
    assert (ref - m_student).abs().max() > 1e-2  # the teacher's activations change the student
    for method in ("fast", "stacked", "reference"):
        res = cross_patch(teacher, student, pairs, site, layer_map=LAYER_MAP, normalise=True, method=method)
        assert res.corrupt == pytest.approx(m_student, abs=1e-5) and res.clean == pytest.approx(m_teacher, abs=1e-5)
        torch.testing.assert_close(res.raw, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(res.values, (ref - m_student) / (m_teacher - m_student), atol=1e-4, rtol=1e-4)
