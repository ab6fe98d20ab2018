"""Tests written for mutants of circuitkd/attention/ that the suite let live (docs/testing.md lists them).

Pattern correlation against a hand-computed Pearson coefficient, and linear CKA's invariance to
scale on representations whose norms are far below 1 (the mutants zeroed or distorted both).
"""
import torch

from circuitkd.attention.similarity import _PairSimilarity, linear_cka


def test_pattern_correlation_is_pearsons_over_real_entries():
    """Kills: a variance clamped at 1 instead of 0 (attention weights have variances far below 1)."""
    g = torch.Generator().manual_seed(0)
    # near-uniform rows, as in a barely trained model: the summed squared deviations stay below 1
    ps = torch.softmax(0.3 * torch.randn(3, 2, 5, 5, generator=g), -1)
    pt = torch.softmax(0.3 * torch.randn(3, 2, 5, 5, generator=g), -1)
    acc = _PairSimilarity(2, 2)
    acc.update(ps, pt, torch.ones(3, 5))
    got = acc.correlation()
    for s in range(2):
        for t in range(2):
            want = torch.corrcoef(torch.stack([ps[:, s].flatten(), pt[:, t].flatten()]))[0, 1]
            assert abs(float(got[s, t]) - float(want)) < 1e-5, (s, t)


def test_linear_cka_is_one_for_identical_small_representations():
    """Kills: CKA returning 0 whenever the denominator is below 1 instead of at 0."""
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(1)) * 1e-3
    assert abs(linear_cka(x, x) - 1.0) < 1e-5
    assert abs(linear_cka(x, 3.0 * x) - 1.0) < 1e-5


def test_diff_attention_uses_n_examples_and_records_its_settings():
    """Kills: diff_attention ignoring ``n`` (every example of the split), and saving the similarity
    measure under another key."""
    from circuitkd.attention import diff_attention
    from tests.test_attention import nli_like_task, tiny

    task, model = nli_like_task(8), tiny(n_layers=1, n_heads=2)
    diff = diff_attention(model, model, task, n=3, confirm="none", similarity="corr")
    assert len(task.split("ood_test")) > 3 and diff.info["n"] == 3
    assert diff.info["similarity"] == "corr" and diff.info["cka_positions"] == "all"


def _accumulate(real, *, alignment=False, premise=None, hypothesis=None, tokens=None, seed=2):
    """One padded batch through the statistics accumulator; returns the patterns and the result."""
    from circuitkd.attention.statistics import _HeadStats

    b, P = real.shape
    g = torch.Generator().manual_seed(seed)
    pattern = torch.softmax(torch.randn(b, 1, 2, P, P, generator=g, dtype=torch.float64), -1)
    classes = torch.zeros(b, 1, P, dtype=torch.bool)
    classes[:, 0, 0] = True
    acc = _HeadStats(1, 2, ["cls"], causal=False, alignment=alignment, tokens=tokens is not None)
    acc.update(pattern, real.double(), torch.zeros(b, dtype=torch.long), classes, tokens, premise, hypothesis)
    return pattern, acc.result(("cls",), None, "native")


def test_positional_scores_count_examples_with_a_single_real_pair():
    """Kills: examples whose padding leaves exactly one (i-1, i) pair of real positions dropped from
    the previous/next-token means (``cnt > 1`` for ``cnt > 0``). Hand means over examples of each
    example's mean over its real pairs; an example with one real position has no pair and no say."""
    real = torch.tensor([[1, 1, 0, 0, 0],  # one real pair: (0, 1)
                         [1, 1, 1, 1, 0],  # three: (0, 1), (1, 2), (2, 3)
                         [1, 0, 0, 0, 0]])  # none: left out of both means
    pattern, stats = _accumulate(real)
    p = pattern[:, 0]  # [b head q k]
    prev = (p[0, :, 1, 0] + (p[1, :, 1, 0] + p[1, :, 2, 1] + p[1, :, 3, 2]) / 3) / 2
    nxt = (p[0, :, 0, 1] + (p[1, :, 0, 1] + p[1, :, 1, 2] + p[1, :, 2, 3]) / 3) / 2
    torch.testing.assert_close(stats.prev_token[0], prev.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(stats.next_token[0], nxt.float(), atol=1e-6, rtol=0)


def test_alignment_is_scored_only_when_the_accumulator_keeps_it_and_both_classes_are_given():
    """Kills: ``and`` -> ``or`` in the alignment guard of ``_HeadStats.update``. The public entry point
    passes premise/hypothesis masks exactly when the accumulator was built for alignment, so this pins
    the accumulator's own contract: premise/hypothesis given to one built without alignment are ignored,
    one built with alignment but given no masks skips the score, and given both it is the hand mean."""
    real = torch.ones(2, 4)
    tokens = torch.tensor([[5, 6, 5, 7], [8, 9, 9, 8]])
    premise = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    hypothesis = ~premise
    _, without = _accumulate(real, tokens=tokens, premise=premise, hypothesis=hypothesis)
    assert without.alignment is None
    _, no_masks = _accumulate(real, tokens=tokens, alignment=True)
    assert no_masks.alignment is not None and torch.isnan(no_masks.alignment).all()
    pattern, kept = _accumulate(real, tokens=tokens, alignment=True, premise=premise, hypothesis=hypothesis)
    p = pattern[:, 0]
    # ex 0: hypothesis token 2 (id 5) matches premise 0; token 3 (id 7) has no match.
    # ex 1: token 2 (id 9) matches premise 1, token 3 (id 8) matches premise 0.
    want = (p[0, :, 2, 0] + (p[1, :, 2, 1] + p[1, :, 3, 0]) / 2) / 2
    torch.testing.assert_close(kept.alignment[0], want.float(), atol=1e-6, rtol=0)


def test_shortcut_heads_ablate_with_means_over_real_tokens_of_the_masked_run():
    """Kills: ``shortcut_heads`` computing its mean-ablation values without the split's attention mask
    (padding counted in the means and attended to). Reference by plain hooks on a padded NLI-like
    split: each head's ``z`` averaged per position over the real tokens of the masked forward, then
    written over that head on the bias-conflicting examples; the change of the mean logit difference
    (gold label - the label the negation shortcut predicts) is each head's ablation effect."""
    from circuitkd import attention as A
    from tests.test_attention import nli_like_task, tiny

    torch.manual_seed(0)
    task, model = nli_like_task(16), tiny()
    split = task.split("ood_test")
    res = A.shortcut_heads(model, task, n=None, shortcut="negation", confirm="ablation", min_effect=0.0)

    x, mask = split.inputs, split.attention_mask
    L, H = model.cfg.n_layers, model.cfg.n_heads
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(L)]
    with torch.no_grad():
        _, cache = model.run_with_cache(x, attention_mask=mask, names_filter=lambda n: n in names)
    real = mask.double()[:, :, None, None]
    means = [(cache[n].double() * real).sum(0) / real.sum(0).clamp_min(1) for n in names]  # [pos head d_head]
    neg = split.bias_labels["negation"]
    conflicting = (neg >= 0) & (neg != split.labels)
    xc, mc, gold, blab = x[conflicting], mask[conflicting], split.labels[conflicting], neg[conflicting]
    assert 0 < len(gold) < len(split) and bool((mask == 0).any())
    rows = torch.arange(len(gold))

    def logit_diff(hooks=()):
        with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
            out = model(xc, attention_mask=mc)
        out = out[:, 0] if out.dim() == 3 else out
        return (out[rows, gold] - out[rows, blab]).double().mean()

    base = logit_diff()
    want = torch.zeros(L, H, dtype=torch.float64)
    for layer in range(L):
        for h in range(H):
            def put(z, hook, layer=layer, h=h):
                z = z.clone()
                z[:, :, h] = means[layer][:, h].to(z.dtype)
                return z
            want[layer, h] = logit_diff([(names[layer], put)]) - base
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(res.ablation_logit_diff.double(), want, atol=1e-5, rtol=1e-4)
