"""patching.py: every fast path against the slow reference (one forward per component) and TransformerLens."""
from __future__ import annotations

import os

import pytest
import torch

from circuitkd import CircuitKDError, ModelSpec, PromptPairs, build_model
from circuitkd.hooks import Site, capture, edit_hooks
from circuitkd.metrics import KLToClean, Prob
from circuitkd.metrics import read_positions
from circuitkd.native import NativeExecutor
from circuitkd.patching import (
    SITES, attribution_patch, correlation, cross_patch, patch, patch_result, path_patch,
)

torch.set_num_threads(1)
os.environ.setdefault("TQDM_DISABLE", "1")

N_PAIRS, N_POS = 5, 8


def _native(**kw):
    spec = ModelSpec.preset("student").replace(d_vocab=30, n_ctx=N_POS, n_classes=3, d_model=64, **kw)
    return build_model(spec, device="cpu")


@pytest.fixture(scope="module")
def native3():
    """Three layers: exercises a patch's sparse layer, a dense middle layer and the read-out-only last layer."""
    return _native(n_layers=3)


@pytest.fixture(scope="module")
def bert():
    return build_model(ModelSpec.preset("bert-student", d_vocab=30, n_ctx=N_POS, n_classes=3, d_model=32), device="cpu")


@pytest.fixture(scope="module")
def vit():
    return build_model(ModelSpec.preset("vit-student", n_classes=2, d_model=32, image_size=14), device="cpu")


def _pairs(n=N_PAIRS, pos=N_POS, n_classes=3, masked=True, position=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, 30, (n, pos), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2:5] = torch.randint(1, 30, (n, 3), generator=g)
    mask = None
    if masked:
        mask = torch.ones(n, pos, dtype=torch.long)
        mask[0, pos - 2:] = 0
        mask[1, pos - 1:] = 0
    answer = torch.randint(0, n_classes, (n,), generator=g)
    return PromptPairs(clean=clean, corrupt=corrupt, clean_answer=answer, corrupt_answer=(answer + 1) % n_classes,
                       attention_mask=mask, position=position)


def _pixel_pairs(n=4):
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(n, 3, 14, 14, generator=g)
    corrupt = clean.clone()
    corrupt[:, :, :7, :7] = torch.rand(n, 3, 7, 7, generator=g)
    answer = torch.randint(0, 2, (n,), generator=g)
    return PromptPairs(clean=clean, corrupt=corrupt, clean_answer=answer, corrupt_answer=1 - answer)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- native executor


@pytest.mark.parametrize("causal", [False, True])
def test_native_executor_equals_bridge(causal):
    model = _native(causal=causal)
    pairs = _pairs(position=-1 if causal else 0)
    with torch.inference_mode():
        cache = NativeExecutor(model).run(pairs.clean, pairs.attention_mask, read_positions(pairs, N_POS))
        out = model(pairs.clean, attention_mask=pairs.attention_mask)
    r = read_positions(pairs, N_POS)
    _close(cache.logits, out[torch.arange(N_PAIRS), r])
    with torch.inference_mode(), capture(model, [Site(1, "z"), Site(0, "resid_mid")], attention_mask=pairs.attention_mask) as acts:
        model(pairs.clean, attention_mask=pairs.attention_mask)
    _close(cache.z[1], acts[Site(1, "z")])
    _close(cache.resid_mid[0], acts[Site(0, "resid_mid")])


# ---------------------------------------------------------------------------- fast / stacked vs reference


@pytest.mark.parametrize("site", sorted(SITES))
def test_native_fast_and_stacked_equal_reference(native3, site):
    pairs = _pairs()
    direction = "noise" if site.endswith(("_pos", "_layer")) else "denoise"  # both directions, split across sites
    # positions: the read-out (0), one that differs between clean and corrupt (3), a padded one (7)
    kw = dict(direction=direction, normalise=False, positions=[0, 3, 7])
    res = patch_result(native3, pairs, site, method="reference", **kw)
    ref = res.values
    fast = patch(native3, pairs, site, method="fast", copies_per_forward=5, batch_size=3, **kw)
    stacked = patch(native3, pairs, site, method="stacked", copies_per_forward=7, batch_size=3, **kw)
    assert ref.shape == tuple(3 if a == "layer" else 4 if a == "head" else 3 for a in SITES[site].axes)
    # the sweep measures something: some patch moves the metric away from the unpatched base run's
    base = res.corrupt if direction == "denoise" else res.clean
    assert (ref - base).abs().max() > 1e-3
    _close(fast, ref)
    _close(stacked, ref)


@pytest.mark.parametrize("site", ["head_pos", "resid", "k_pos", "mlp_out_layer"])
def test_causal_native_fast_equals_reference(site):
    model = _native(causal=True)
    pairs = _pairs(position=-1)
    kw = dict(normalise=False, positions=[1, 3, 5, 7])
    _close(patch(model, pairs, site, method="fast", **kw), patch(model, pairs, site, method="reference", **kw))


@pytest.mark.parametrize("site", ["head_pos", "resid_mid", "attn_out", "mlp_out_layer", "q", "k_pos", "v"])
def test_bert_stacked_equals_reference(bert, site):
    pairs = _pairs()
    kw = dict(normalise=False, positions=[0, 3, 7])
    _close(patch(bert, pairs, site, method="stacked", copies_per_forward=6, batch_size=3, **kw),
           patch(bert, pairs, site, method="reference", **kw))
    assert patch_result(bert, pairs, site, normalise=False).method == "stacked"


@pytest.mark.parametrize("site", ["head_pos", "resid", "resid_mid", "attn_out_layer", "v_pos"])
def test_vit_stacked_equals_reference(vit, site):
    pairs = _pixel_pairs()
    kw = dict(normalise=False, positions=[0, 1, 4])
    _close(patch(vit, pairs, site, method="stacked", **kw), patch(vit, pairs, site, method="reference", **kw))


# ---------------------------------------------------------------------------- transformer_lens.patching


_TL = {
    "resid_pre": ("get_act_patch_resid_pre", "layer pos"),
    "attn_out": ("get_act_patch_attn_out", "layer pos"),
    "mlp_out": ("get_act_patch_mlp_out", "layer pos"),
    "head_pos": ("get_act_patch_attn_head_out_by_pos", "layer pos head"),
    "head": ("get_act_patch_attn_head_out_all_pos", "layer head"),
    "q_pos": ("get_act_patch_attn_head_q_by_pos", "layer pos head"),
    "k_pos": ("get_act_patch_attn_head_k_by_pos", "layer pos head"),
    "v": ("get_act_patch_attn_head_v_all_pos", "layer head"),
    "pattern_pos": ("get_act_patch_attn_head_pattern_by_pos", "layer head pos"),
}


@pytest.mark.parametrize("site", sorted(_TL))
def test_equals_transformer_lens_patching(site):
    import transformer_lens.patching as tlp  # a dependency: an import error must fail, not skip
    model = _native()
    pairs = _pairs(masked=False)  # TL's patching passes no attention mask
    fn_name, axes = _TL[site]
    a, b = pairs.clean_answer[:, None], pairs.corrupt_answer[:, None]

    def metric(logits):
        at = logits[:, 0]
        return (at.gather(1, a) - at.gather(1, b)).mean()

    with torch.inference_mode():
        _, cache = model.run_with_cache(pairs.clean)
        expected = getattr(tlp, fn_name)(model, pairs.corrupt, cache, metric)
    if axes == "layer pos head":
        expected = expected.permute(0, 2, 1)
    _close(patch(model, pairs, site, normalise=False), expected.float())


# ---------------------------------------------------------------------------- metrics, normalisation, directions


def test_normalised_recovery_is_one_where_the_only_difference_is():
    model = _native()
    pairs = _pairs(masked=False)
    pairs.corrupt = pairs.clean.clone()
    pairs.corrupt[:, 3] = (pairs.clean[:, 3] + 1) % 30  # the inputs differ at position 3 only
    # layer 0's residual differs only at position 3: patching it there reproduces the other run exactly
    denoise = patch(model, pairs, "resid", direction="denoise")[0]
    noise = patch(model, pairs, "resid", direction="noise")[0]
    expected = torch.zeros(N_POS)
    expected[3] = 1.0
    _close(denoise, expected)
    _close(noise, 1.0 - expected)
    res = patch_result(model, pairs, "resid")
    _close(res.values, ((res.raw - res.corrupt) / (res.clean - res.corrupt)).float())


@pytest.mark.parametrize("metric", ["prob", "kl", "custom"])
def test_other_metrics_fast_equals_reference(native3, metric):
    pairs = _pairs()
    m = {"prob": Prob("clean"), "kl": KLToClean(), "custom": lambda logits, p, clean_logits=None: logits[:, 0] * 2.0}[metric]
    # raw values: normalising by a small clean-corrupt gap would only amplify float noise
    ref = patch(native3, pairs, "head_pos", metric=m, method="reference", layers=[1], normalise=False)
    _close(patch(native3, pairs, "head_pos", metric=m, method="fast", layers=[1], normalise=False), ref)
    if metric == "kl":
        # KL(p_clean || p_run): 0 on the clean run, KL(p_clean || p_corrupt) on the corrupt one (torch's kl_div),
        # and patching layer 0's residual where clean and corrupt tokens agree leaves the corrupt run's value
        res = patch_result(native3, pairs, "resid_pre", metric=m, normalise=False, layers=[0], positions=[0, 1, 5, 6, 7])
        with torch.inference_mode():
            log_p = native3(pairs.clean, attention_mask=pairs.attention_mask)[:, 0].double().log_softmax(-1)
            log_q = native3(pairs.corrupt, attention_mask=pairs.attention_mask)[:, 0].double().log_softmax(-1)
        kl = float(torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean())
        assert res.clean == pytest.approx(0.0, abs=1e-7) and res.corrupt == pytest.approx(kl, rel=1e-4)
        _close(res.raw, torch.full_like(res.raw, kl))


# ---------------------------------------------------------------------------- cross-model patching


def test_cross_model_patching_fast_stacked_reference():
    teacher = _native(n_layers=4, seed=1)
    student = _native(n_layers=2, seed=2)
    pairs = _pairs()
    for site in ("head_pos", "resid", "v", "mlp_out_layer"):
        ref = cross_patch(teacher, student, pairs, site, method="reference", normalise=False).values
        _close(cross_patch(teacher, student, pairs, site, method="fast", normalise=False).values, ref)
        _close(cross_patch(teacher, student, pairs, site, method="stacked", normalise=False).values, ref)
    # patching the whole residual stream at a layer gives the source's residual there:
    # with identity layer_map onto an identical copy, nothing changes
    same = _native(n_layers=2, seed=2)
    raw = cross_patch(same, student, pairs, "attn_out_layer", normalise=False)
    _close(raw.raw, torch.full_like(raw.raw, raw.corrupt))


def test_cross_model_shape_mismatch_raises():
    wide = build_model(ModelSpec.preset("student").replace(d_vocab=30, n_ctx=N_POS, n_classes=3), device="cpu")
    with pytest.raises(CircuitKDError, match="d_model=64, source d_model=128"):
        cross_patch(wide, _native(), _pairs(), "head")
    with pytest.raises(CircuitKDError, match="layer_map"):
        cross_patch(_native(seed=3), _native(), _pairs(), "head", layer_map=[0, 5])


# ---------------------------------------------------------------------------- path patching


def test_path_patching_to_logits_is_the_direct_effect():
    model = _native(n_layers=3)
    pairs = _pairs()
    ex = NativeExecutor(model)
    got = path_patch(model, pairs, "logits", normalise=False, batch_size=3)
    r = read_positions(pairs, N_POS)
    with torch.inference_mode():
        base, src = ex.run(pairs.corrupt, pairs.attention_mask, r), ex.run(pairs.clean, pairs.attention_mask, r)
    ar = torch.arange(N_PAIRS)
    for layer in range(3):
        for head in range(4):
            d = (src.z[layer][ar, r, head] - base.z[layer][ar, r, head]) @ ex.layers[layer]["W_O"][head]
            logits = ex.logits(base.resid_post[-1][ar, r] + d)
            m = logits.gather(1, pairs.clean_answer[:, None]) - logits.gather(1, pairs.corrupt_answer[:, None])
            assert abs(float(got[layer, head]) - float(m.mean().detach())) < 1e-5


def test_path_patching_through_receiver_queries():
    model = _native(n_layers=3)
    pairs = _pairs()
    receivers = [(2, 1, "q"), (2, 3, "q")]
    got = path_patch(model, pairs, receivers, normalise=False)
    assert got.shape == (3, 4) and got[2].isnan().all()
    # reference: the receiver's query input is the base residual plus the sender's output change
    ex = NativeExecutor(model)
    r = read_positions(pairs, N_POS)
    with torch.inference_mode():
        base, src = ex.run(pairs.corrupt, pairs.attention_mask, r), ex.run(pairs.clean, pairs.attention_mask, r)
    p = ex.layers[2]
    for sl, sh in [(0, 2), (1, 0)]:
        d = (src.z[sl][:, :, sh] - base.z[sl][:, :, sh]) @ ex.layers[sl]["W_O"][sh]
        q_new = ex.heads(p["q"], ex.ln(base.resid_pre[2] + d, p["ln1"]))

        def hook(act, *, hook):
            act = act.clone()
            act[:, :, [1, 3]] = q_new[:, :, [1, 3]]
            return act

        with torch.inference_mode(), edit_hooks(model, [("blocks.2.attn.hook_q", hook)]):
            logits = model(pairs.corrupt, attention_mask=pairs.attention_mask)[:, 0]
        m = logits.gather(1, pairs.clean_answer[:, None]) - logits.gather(1, pairs.corrupt_answer[:, None])
        assert abs(float(got[sl, sh]) - float(m.mean())) < 1e-5


# ---------------------------------------------------------------------------- attribution patching


def test_attribution_matches_autograd_and_correlates_with_exact(native3):
    pairs = _pairs(n=16, seed=3)
    attr = attribution_patch(native3, pairs, "head_pos", normalise=False, batch_size=16)
    exact = patch(native3, pairs, "head_pos", normalise=False)
    assert attr.shape == exact.shape
    assert correlation(attr, exact) > 0.6
    # the estimate for resid_pre at layer 0 equals grad · Δ computed by hand
    est = attribution_patch(native3, pairs, "resid", normalise=False, batch_size=7)
    with torch.inference_mode(), capture(native3, [Site(0, "resid_pre")], attention_mask=pairs.attention_mask) as acts:
        native3(pairs.clean, attention_mask=pairs.attention_mask)
    clean0 = acts[Site(0, "resid_pre")].clone()
    store = {}
    with capture(native3, [Site(0, "resid_pre")], attention_mask=pairs.attention_mask, grad=True) as acts:
        logits = native3(pairs.corrupt, attention_mask=pairs.attention_mask)[:, 0]
        m = logits.gather(1, pairs.clean_answer[:, None]) - logits.gather(1, pairs.corrupt_answer[:, None])
        m.mean().backward()
        store = dict(acts)
    native3.zero_grad(set_to_none=True)
    a = store[Site(0, "resid_pre")]
    by_hand = float(m.mean().detach()) + (a.grad * (clean0 - a.detach())).sum(dim=(0, 2))
    _close(est[0], by_hand.float())


def test_attribution_on_bert_and_vit(bert, vit):
    for model, pairs in ((bert, _pairs()), (vit, _pixel_pairs())):
        for direction in ("denoise", "noise"):
            attr = attribution_patch(model, pairs, "head", normalise=False, direction=direction)
            exact = patch(model, pairs, "head", normalise=False, direction=direction)
            assert attr.shape == exact.shape and torch.isfinite(attr).all()
            # the heads' effects differ, and the first-order estimate ranks them as exact patching does
            # (correlation 0.9995 or more on these untrained models)
            assert exact.std() > 0 and correlation(attr, exact) > 0.95, direction


# ---------------------------------------------------------------------------- bad input


def test_bad_input_raises_naming_it(native3, bert):
    pairs = _pairs()
    with pytest.raises(CircuitKDError, match="clean and corrupt differ in shape: 8 vs 7 tokens"):
        PromptPairs(clean=pairs.clean, corrupt=pairs.corrupt[:, :7], clean_answer=pairs.clean_answer,
                    corrupt_answer=pairs.corrupt_answer)
    bad = _pairs()
    bad.corrupt = bad.corrupt[:, :6]
    with pytest.raises(CircuitKDError, match=r"clean and corrupt differ in shape"):
        patch(native3, bad, "head")
    with pytest.raises(CircuitKDError, match="head index 4 out of range"):
        patch(native3, pairs, "head", heads=[4])
    with pytest.raises(CircuitKDError, match="head index 9 out of range"):
        path_patch(native3, pairs, [(2, 9, "q")])
    with pytest.raises(CircuitKDError, match="unknown patching site 'heads'"):
        patch(native3, pairs, "heads")
    with pytest.raises(CircuitKDError, match="bert backbone's HF attention has no editable attention pattern"):
        patch(bert, pairs, "pattern")
    with pytest.raises(CircuitKDError, match="method='fast' needs a native"):
        patch(bert, pairs, "head", method="fast")
    with pytest.raises(CircuitKDError, match="layer 3 out of range"):
        patch(native3, pairs, "resid", layers=[3])
    with pytest.raises(CircuitKDError, match="direction"):
        patch(native3, pairs, "resid", direction="sideways")
    with pytest.raises(CircuitKDError, match="metric must return one number per example"):
        patch(native3, pairs, "resid", metric=lambda logits, p, clean_logits=None: logits.sum())


def test_hooks_removed_after_a_failing_metric(bert):
    before = sum(len(hp.fwd_hooks) for hp in bert.hook_dict.values())
    calls = {"n": 0}

    def metric(logits, p, clean_logits=None):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("metric failed")
        return logits[:, 0]

    with pytest.raises(RuntimeError, match="metric failed"):
        patch(bert, _pairs(), "head", metric=metric)
    assert sum(len(hp.fwd_hooks) for hp in bert.hook_dict.values()) == before


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["student", "teacher"])
def test_default_presets_every_site_both_directions(preset):
    model = build_model(ModelSpec.preset(preset).replace(d_vocab=30, n_ctx=12, n_classes=3), device="cpu")
    pairs = _pairs(n=6, pos=12)
    for site in SITES:
        for direction in ("denoise", "noise"):
            kw = dict(direction=direction, normalise=False)
            ref = patch(model, pairs, site, method="reference", **kw)
            _close(patch(model, pairs, site, method="fast", batch_size=4, **kw), ref)
            _close(patch(model, pairs, site, method="stacked", batch_size=4, **kw), ref)
