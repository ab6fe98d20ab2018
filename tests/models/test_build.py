import pytest
import torch

from circuitkd.config import ModelSpec
from circuitkd.errors import CircuitKDError
from circuitkd.models import build_model, class_logits, spec_of
from tests.conftest import toy_text_task


@pytest.mark.parametrize("preset", ["tiny", "bert-student"])
def test_text_models_give_class_logits_and_honour_padding(preset):
    model = build_model(ModelSpec.preset(preset, d_vocab=30, n_ctx=12, n_classes=3), device="cpu")
    x = torch.randint(4, 30, (2, 10))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    logits = class_logits(model, x, mask)
    assert logits.shape == (2, 3)
    # padding is masked: changing padded tokens leaves the output unchanged
    x2 = x.clone()
    x2[1, 6:] = 3
    assert torch.allclose(class_logits(model, x2, mask), logits, atol=1e-5)
    assert not torch.allclose(class_logits(model, x2), class_logits(model, x), atol=1e-5)


def test_vit_model_reads_pixels():
    model = build_model(ModelSpec.preset("vit-student", n_classes=2, d_model=32), device="cpu")
    assert class_logits(model, torch.rand(3, 3, 28, 28)).shape == (3, 2)


def test_same_seed_same_model_other_seed_differs():
    spec = ModelSpec.preset("tiny", d_vocab=30, n_ctx=12, n_classes=3)
    x = torch.randint(0, 30, (2, 10))
    a, b, c = build_model(spec), build_model(spec), build_model(spec.replace(seed=1))
    assert torch.equal(class_logits(a, x), class_logits(b, x))
    assert not torch.allclose(class_logits(a, x), class_logits(c, x))


def test_spec_is_resolved_from_task_and_checked():
    task = toy_text_task()
    model = build_model(ModelSpec.preset("tiny"), task)
    assert spec_of(model).n_classes == 2 and spec_of(model).d_vocab == 20
    with pytest.raises(CircuitKDError, match="2 labels but the model spec declares n_classes=3"):
        build_model(ModelSpec.preset("tiny", n_classes=3), task)
    with pytest.raises(CircuitKDError, match="cannot read the text task"):
        build_model(ModelSpec.preset("vit-student"), task)


def test_bad_specs_are_named():
    with pytest.raises(CircuitKDError, match="unknown preset 'huge'"):
        ModelSpec.preset("huge")
    with pytest.raises(CircuitKDError, match="not divisible by n_heads"):
        ModelSpec(d_model=30, n_heads=4)
    with pytest.raises(CircuitKDError, match="unknown backbone"):
        ModelSpec(backbone="lstm")
    with pytest.raises(CircuitKDError, match="no n_classes"):
        build_model(ModelSpec.preset("tiny", d_vocab=10, n_ctx=8))


def test_pretrained_bert_from_a_local_folder(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    hf = BertForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "bert")
    x = torch.randint(0, 40, (2, 9))
    expected = hf(input_ids=x).logits
    model = build_model(ModelSpec(backbone="bert", pretrained=str(tmp_path / "bert")), device="cpu")
    spec = spec_of(model)
    assert (spec.n_layers, spec.d_model, spec.n_heads, spec.n_classes) == (2, 32, 2, 3)
    assert torch.allclose(class_logits(model, x), expected, atol=1e-5)
    with pytest.raises(CircuitKDError, match="not found"):
        build_model(ModelSpec(backbone="bert", pretrained=str(tmp_path / "missing")))


def test_teacher_and_student_of_one_seed_do_not_share_their_first_layers():
    common = dict(d_vocab=30, n_ctx=12, n_classes=3)
    teacher = build_model(ModelSpec.preset("teacher", **common))
    student = build_model(ModelSpec.preset("student", **common))
    t_w = teacher.state_dict()["blocks.0.attn.q.weight"]
    s_w = student.state_dict()["blocks.0.attn.q.weight"]
    assert t_w.shape == s_w.shape and not torch.allclose(t_w, s_w)
