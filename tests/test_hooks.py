"""hooks.py: typed sites -> bridge hook names, backbone quirks, head outputs, scoped hooks."""
from __future__ import annotations

import pytest
import torch

from circuitkd import CircuitKDError, ModelSpec, build_model
from circuitkd.hooks import (
    KINDS, Site, all_sites, backbone_of, capture, edit_hooks, edit_point, head_output, hook_name,
    pattern_from_qk,
)

torch.set_num_threads(1)


def _native(**kw):
    return build_model(ModelSpec.preset("student").replace(d_vocab=30, n_ctx=10, n_classes=3, **kw), device="cpu")


@pytest.fixture(scope="module")
def native():
    return _native()


@pytest.fixture(scope="module")
def bert():
    return build_model(ModelSpec.preset("bert-student", d_vocab=30, n_ctx=10, n_classes=3, d_model=32), device="cpu")


@pytest.fixture(scope="module")
def vit():
    return build_model(ModelSpec.preset("vit-student", n_classes=2, d_model=32), device="cpu")


def _tokens(n=3, pos=10):
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 30, (n, pos), generator=g)
    mask = torch.ones(n, pos, dtype=torch.long)
    mask[0, 7:] = 0
    return toks, mask


def _n_hooks(model) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())


def test_every_site_maps_to_an_existing_hook(native, bert, vit):
    for model in (native, bert, vit):
        for site in all_sites(model, [k for k in KINDS if k not in ("pattern",)]):
            assert hook_name(model, site) in model.hook_dict, (backbone_of(model), site)
        for kind in ("embed", "final") if backbone_of(model) != "bert" else ("embed",):
            assert hook_name(model, Site(None, kind)) in model.hook_dict
    assert hook_name(native, Site(1, "pattern")) == "blocks.1.attn.hook_pattern"


def test_bert_post_ln_quirks(bert):
    # the attention's own write, not the post-LN alias hook_attn_out
    assert hook_name(bert, Site(0, "attn_out")) == "blocks.0.attn.o.hook_out"
    assert hook_name(bert, Site(0, "resid_mid")) == "blocks.0.ln1.hook_out"
    toks, mask = _tokens()
    sites = [Site(0, "resid_pre"), Site(0, "attn_out"), Site(0, "resid_mid"), Site(0, "mlp_out"), Site(0, "resid_post")]
    with torch.inference_mode(), capture(bert, sites, attention_mask=mask) as acts:
        bert(toks, attention_mask=mask)
    ln1 = bert.blocks[0].ln1.original_component
    ln2 = bert.blocks[0].ln2.original_component
    mid = ln1(acts[sites[0]] + acts[sites[1]])
    torch.testing.assert_close(acts[sites[2]], mid, atol=1e-5, rtol=0)
    torch.testing.assert_close(acts[sites[4]], ln2(mid + acts[sites[3]]), atol=1e-5, rtol=0)


def test_head_outputs_sum_to_attention_output(native, bert, vit):
    for model in (native, bert, vit):
        x = torch.randn(2, 3, 28, 28) if backbone_of(model) == "vit" else _tokens()[0]
        with torch.inference_mode(), capture(model, [Site(1, "head_out"), Site(1, "attn_out"), Site(1, "z")]) as acts:
            model(x)
        total = acts[Site(1, "head_out")].sum(2) + model.blocks[1].attn.b_O
        torch.testing.assert_close(total, acts[Site(1, "attn_out")], atol=1e-5, rtol=0)
        torch.testing.assert_close(acts[Site(1, "head_out")], head_output(model, 1, acts[Site(1, "z")]))


def test_pattern_from_qk_matches_native_pattern_hook():
    for causal in (False, True):
        model = _native(causal=causal)
        toks, mask = _tokens()
        _, cache = model.run_with_cache(toks, attention_mask=mask)
        pat = pattern_from_qk(model, cache["blocks.1.attn.hook_q"], cache["blocks.1.attn.hook_k"], mask)
        torch.testing.assert_close(pat, cache["blocks.1.attn.hook_pattern"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["bert", "vit"])
def test_hf_pattern_reproduces_hf_attention(which, bert, vit):
    # HF attention exposes no pattern: the one computed from q, k and the mask must give HF's z
    model = bert if which == "bert" else vit
    x, mask = (_tokens() if which == "bert" else (torch.randn(2, 3, 28, 28), None))
    sites = [Site(0, "pattern"), Site(0, "v"), Site(0, "z")]
    with torch.inference_mode(), capture(model, sites, attention_mask=mask) as acts:
        model(x, attention_mask=mask) if mask is not None else model(x)
    z = torch.einsum("bhqk,bkhd->bqhd", acts[sites[0]], acts[sites[1]])
    real = slice(None) if mask is None else mask.bool()
    torch.testing.assert_close(z[real], acts[sites[2]][real], atol=1e-5, rtol=0)


def test_resid_mid_is_edited_through_the_attention_output(native):
    # Replacing hook_resid_mid (ln2's input) does not move the residual; edit_point does.
    toks, _ = _tokens()
    name, additive = edit_point(native, Site(0, "resid_mid"))
    assert additive and name == "blocks.0.attn.o.hook_out"
    bump = torch.zeros(native.cfg.d_model)
    bump[0] = 1.0
    sites = [Site(0, "resid_mid"), Site(0, "mlp_out"), Site(0, "resid_post")]
    with torch.inference_mode(), capture(native, sites) as acts:
        native(toks)
        base = dict(acts)
        with edit_hooks(native, [(name, lambda a, *, hook: a + bump)]):
            native(toks)
    torch.testing.assert_close(acts[sites[0]], base[sites[0]] + bump)
    torch.testing.assert_close(acts[sites[2]], acts[sites[0]] + acts[sites[1]], atol=1e-5, rtol=0)


def test_hooks_removed_after_exception(native, bert):
    for model in (native, bert):
        before = _n_hooks(model)

        def boom(act, *, hook):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            with edit_hooks(model, [("blocks.0.hook_resid_pre", boom)]):
                model(_tokens()[0])
        assert _n_hooks(model) == before
        with pytest.raises(ZeroDivisionError):
            with capture(model, [Site(0, "z")]):
                1 / 0
        assert _n_hooks(model) == before


def test_capture_with_grad_fills_grads(native):
    toks, _ = _tokens()
    with capture(native, [Site(0, "z"), Site(1, "resid_pre")], grad=True) as acts:
        native(toks)[:, 0].sum().backward()
    assert acts[Site(0, "z")].grad is not None and acts[Site(0, "z")].grad.abs().sum() > 0
    assert acts[Site(1, "resid_pre")].grad is not None
    native.zero_grad(set_to_none=True)


def test_bad_sites_raise_naming_them(native, bert):
    with pytest.raises(CircuitKDError, match="unknown site kind 'resid'"):
        Site(0, "resid")
    with pytest.raises(CircuitKDError, match="layer 5 out of range"):
        hook_name(native, Site(5, "z"))
    with pytest.raises(CircuitKDError, match="head index 9 out of range"):
        hook_name(native, Site(0, "z", head=9))
    with pytest.raises(CircuitKDError, match="no editable attention pattern"):
        hook_name(bert, Site(0, "pattern"))
    with pytest.raises(CircuitKDError, match="has no heads"):
        Site(0, "mlp_out", head=1)
    attn_only = _native(attn_only=True)
    with pytest.raises(CircuitKDError, match="no MLP"):
        hook_name(attn_only, Site(0, "mlp_out"))
