import json

import pytest
import torch

from circuitkd.data.tokenizer import WordTokenizer
from circuitkd.errors import CircuitKDError

torch.set_num_threads(1)

WORDS = ["the", "doctor", "helped", "judge", "never", "ignored"]


@pytest.fixture
def tok():
    return WordTokenizer(WORDS)


def test_special_ids_and_sizes(tok):
    assert (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(tok) == 4 + len(WORDS)
    assert tok.convert_tokens_to_ids("the") == 4
    assert tok.convert_tokens_to_ids(["doctor", "nurse"]) == [5, tok.unk_token_id]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]


def test_encode_layout_and_decode(tok):
    ids = tok.encode("the doctor helped the judge", "the doctor never ignored the judge")
    the, doctor, helped, judge, never, ignored = range(4, 10)
    assert ids == [1, the, doctor, helped, the, judge, 2, the, doctor, never, ignored, the, judge, 2]
    assert tok.encode("the judge") == [1, the, judge, 2]
    assert tok.decode(ids + [0, 0]) == "[CLS] the doctor helped the judge [SEP] the doctor never ignored the judge [SEP]"
    assert tok.decode(torch.tensor(ids), skip_special_tokens=True).split()[:2] == ["the", "doctor"]
    assert tok.encode("The DOCTOR nurse")[1:4] == [the, doctor, tok.unk_token_id]


def test_batch_encode_right_pads(tok):
    ids, mask = tok.batch_encode([("the doctor", "judge"), "the judge helped the doctor"])
    assert ids.dtype == mask.dtype == torch.long
    assert ids.shape == mask.shape == (2, 7)
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    assert ids[0, -1] == tok.pad_token_id
    ids, mask = tok.batch_encode([("the doctor", "the judge")], max_len=10)
    assert ids.shape == (1, 10) and mask.sum() == 7


def test_too_long_input_names_row_and_length(tok):
    with pytest.raises(CircuitKDError, match="input 1 has 7 tokens, longer than max_len=5"):
        tok.batch_encode(["the", "the judge helped the doctor"], max_len=5)
    with pytest.raises(CircuitKDError, match="max_length=3"):
        tok("the doctor helped", max_length=3)


def test_hf_style_call(tok):
    out = tok(["the doctor", "the judge helped the doctor"], ["the judge", "the doctor"])
    assert set(out) == {"input_ids", "attention_mask"}
    ref_ids, ref_mask = tok.batch_encode([("the doctor", "the judge"), ("the judge helped the doctor", "the doctor")])
    assert torch.equal(out["input_ids"], ref_ids) and torch.equal(out["attention_mask"], ref_mask)
    single = tok("the doctor", "the judge", return_tensors=None)
    assert single["input_ids"] == tok.encode("the doctor", "the judge")
    padded = tok("the doctor", padding="max_length", max_length=8, return_token_type_ids=True)
    assert padded["input_ids"].shape == (1, 8)
    cut = tok("the doctor helped the judge", "the judge", max_length=6, truncation=True)
    assert cut["input_ids"][0, -1] == tok.sep_token_id and cut["input_ids"].shape == (1, 6)
    types = tok("the doctor", "the judge helped", return_token_type_ids=True)["token_type_ids"][0].tolist()
    assert types == [0, 0, 0, 0, 1, 1, 1, 1]


def test_save_load_roundtrip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = WordTokenizer.load(path)
    assert loaded == tok and loaded.tokens == tok.tokens
    assert loaded.encode("the doctor", "the judge") == tok.encode("the doctor", "the judge")
    assert WordTokenizer(tok.tokens) == tok  # special tokens in the list are skipped, ids stay
    assert json.loads(path.read_text())["vocab"][:4] == ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]


def test_bad_inputs_raise(tmp_path):
    with pytest.raises(CircuitKDError, match="does not exist"):
        WordTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CircuitKDError, match="not valid JSON"):
        WordTokenizer.load(bad)
    with pytest.raises(CircuitKDError, match="duplicate"):
        WordTokenizer(["the", "The"])
    with pytest.raises(CircuitKDError, match="whitespace"):
        WordTokenizer(["two words"])
    with pytest.raises(CircuitKDError, match="outside the vocabulary"):
        WordTokenizer(WORDS).decode([99])
