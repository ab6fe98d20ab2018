"""Issue 2's acceptance check: a briefly trained model learns each default task's shortcut.

ID accuracy is high while OOD (bias-conflicting) accuracy is far lower. Seeded; the
thresholds leave about 0.1 of slack around the values measured on this machine
(synthetic NLI at the default study's strength 0.97, tiny preset, 300 steps: id 0.81, ood 0.26; Colored MNIST, 1-layer ViT,
150 steps: id 0.90, ood 0.00).
"""
import circuitkd as ckd


def test_shortcut_is_learned_and_visible_on_synthetic_nli():
    task = ckd.data.synthetic_nli(seed=0, n_train=3000, strength=0.97)
    model = ckd.train_model(ckd.ModelSpec.preset("tiny"), task,
                            cfg=ckd.TrainCfg(steps=300, lr=3e-3, progress=False))
    scores = ckd.evaluate(model, task)
    assert scores["id_acc"] > 0.6
    assert scores["ood_acc"] < scores["id_acc"] - 0.3
    assert scores["worst_group_acc"] < 0.2
    # The gap shows per bias type too, and differs between types: the negation and cue words
    # are picked up at once (measured gaps 1.00 and 0.61), lexical overlap only weakly this
    # early (measured: aligned 0.73 vs conflicting 0.60).
    per_bias = scores["per_bias"]
    for bias in ("negation", "cue"):
        assert per_bias[bias]["aligned_acc"] > per_bias[bias]["conflicting_acc"] + 0.3, bias
    assert per_bias["overlap"]["aligned_acc"] > per_bias["overlap"]["conflicting_acc"]


def test_shortcut_is_learned_and_visible_on_colored_mnist():
    task = ckd.data.colored_mnist(seed=0, n_train=2000, n_id=500, n_ood=500)
    model = ckd.train_model(ckd.ModelSpec.preset("vit-student", d_model=32, n_layers=1), task,
                            cfg=ckd.TrainCfg(steps=150, lr=2e-3, progress=False))
    scores = ckd.evaluate(model, task)
    assert scores["id_acc"] > 0.8
    assert scores["ood_acc"] < 0.3
    assert scores["per_group"]["0|green"] < 0.3 and scores["per_group"]["1|green"] > 0.8
