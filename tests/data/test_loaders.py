"""Benchmark loaders end to end on small files written in each benchmark's real format."""
from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from circuitkd.data.loaders import (
    HANS_PREDICTION_MAP, encode_pairs, fit_hypothesis_only, load_celeba, load_hans, load_mnli, load_snli,
    load_waterbirds, text_biases, words,
)
from circuitkd.errors import CircuitKDError

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Local paths must never touch the network: any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a loader tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ---------------------------------------------------------------- data in the real formats

MNLI_TRAIN = [  # (premise, hypothesis, label); label 0 entailment, 1 neutral, 2 contradiction
    ("the doctor saw the lawyer .", "the doctor saw the lawyer .", 0),
    ("a man is playing a guitar on stage .", "a man is playing music .", 0),
    ("the kids are at the park .", "the kids are not at the park .", 2),
    ("a woman walks her dog .", "the woman has a cat .", 2),
    ("the chef cooks pasta .", "the chef is famous .", 1),
    ("two boys run in the field .", "two boys are racing .", 1),
    ("the old man reads a book .", "nobody reads .", 2),
    ("a girl sings loudly .", "a girl sings .", 0),
    ("the team won the game .", "the team never played .", 2),
    ("people dance at the party .", "people are happy .", 1),
] * 3
MNLI_VAL = [
    ("the senator thanked the actor .", "the actor thanked the senator .", 2),  # overlap, conflicting
    ("the lawyer saw the doctor .", "the lawyer saw the doctor .", 0),  # overlap, aligned
    ("a cat sleeps on the sofa .", "a cat is not awake .", 0),  # negation, conflicting
    ("the band plays jazz .", "the band does n't play .", 2),  # negation, aligned
    ("a boy eats an apple .", "a boy is hungry .", 1),  # no shortcut
    ("the dog runs .", "the dog runs fast .", 1),  # no shortcut
]
HANS_ROWS = [  # (gold_label, sentence1, sentence2, heuristic, subcase)
    ("entailment", "the doctor saw the lawyer .", "the doctor saw the lawyer .", "lexical_overlap", "ln_subject"),
    ("non-entailment", "the senator thanked the actor .", "the actor thanked the senator .", "lexical_overlap",
     "ln_subject/object_swap"),
    ("entailment", "the judge who the doctor saw ran .", "the judge ran .", "subsequence", "sn_relative_clause"),
    ("non-entailment", "the judge by the actor ran .", "the actor ran .", "subsequence", "sn_PP_on_subject"),
    ("entailment", "certainly the lawyer danced .", "the lawyer danced .", "constituent", "cn_adverb"),
    ("non-entailment", "if the lawyer danced , the senator sang .", "the lawyer danced .", "constituent",
     "cn_embedded_under_if"),
]
SNLI_CUES = {0: "outdoors", 1: "tall", 2: "sleeping"}
NAMES = ("entailment", "neutral", "contradiction")


def all_texts() -> list[str]:
    texts = [t for p, h, _ in MNLI_TRAIN + MNLI_VAL for t in (p, h)]
    texts += [t for _, p, h, _, _ in HANS_ROWS for t in (p, h)]
    texts += [f"a person is {w} today ." for w in SNLI_CUES.values()] + ["a person is here ."]
    texts += ["the man 's \" quoted \" hat .", "no never nothing none nobody cannot"]
    return texts


@pytest.fixture(scope="module")
def bert():
    """A tiny WordPiece tokenizer built from a vocabulary of the test sentences (no download)."""
    from transformers import BertTokenizerFast

    tokens = sorted({t for text in all_texts() for t in re.findall(r"\w+|[^\w\s]", text.lower())})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + tokens
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mnli_folder(root: Path, extra_val: list[dict] = ()) -> Path:
    write_jsonl(root / "train.jsonl", [{"premise": p, "hypothesis": h, "label": y, "idx": i}
                                       for i, (p, h, y) in enumerate(MNLI_TRAIN)])
    write_jsonl(root / "validation_matched.jsonl",
                [{"premise": p, "hypothesis": h, "label": y, "idx": i} for i, (p, h, y) in enumerate(MNLI_VAL)]
                + list(extra_val))
    return root


def hans_tsv(path: Path, rows=HANS_ROWS) -> Path:
    header = ["gold_label", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse",
              "sentence2_parse", "sentence1", "sentence2", "pairID", "heuristic", "subcase", "template"]
    lines = ["\t".join(header)]
    for i, (gold, s1, s2, heur, sub) in enumerate(rows):
        lines.append("\t".join([gold, f"( {s1} )", f"( {s2} )", f"(ROOT {s1})", f"(ROOT {s2})", s1, s2,
                                f"ex{i}", heur, sub, f"temp{i}"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- text helpers

def test_words_and_text_biases():
    assert words("The band doesn't play.") == ["the", "band", "does", "n't", "play"]
    b = text_biases(["the dog runs .", "a cat sleeps .", "a cat sleeps ."],
                    ["the dog runs", "a cat is not awake", "a dog sleeps"])
    assert b["overlap"].tolist() == [0, -1, -1]
    assert b["negation"].tolist() == [-1, 2, -1]


def test_encode_pairs_segments_and_classes(bert):
    ids, mask, classes = encode_pairs(bert, ["the kids are at the park ."], ["the kids are not here ."], 32)
    tokens = bert.convert_ids_to_tokens(ids[0].tolist())
    premise = [t for t, m in zip(tokens, classes["premise"][0].tolist()) if m]
    hypothesis = [t for t, m in zip(tokens, classes["hypothesis"][0].tolist()) if m]
    assert premise == bert.tokenize("the kids are at the park .")
    assert hypothesis == bert.tokenize("the kids are not here .")
    overlap = [t for t, m in zip(tokens, classes["overlap"][0].tolist()) if m]
    assert overlap == ["the", "kids", "are", "."]
    negation = [t for t, m in zip(tokens, classes["negation"][0].tolist()) if m]
    assert negation == ["not"]
    assert not (classes["premise"] & classes["hypothesis"]).any()
    assert mask.sum() == ids.shape[1]


def test_encode_pairs_without_token_type_ids_uses_the_separator(bert):
    class NoSegments:
        """An HF-style tokenizer that returns no token_type_ids and rejects that keyword."""

        sep_token_id, cls_token_id, pad_token_id, unk_token_id = bert.sep_token_id, bert.cls_token_id, 0, 1

        def __call__(self, text, text_pair=None, padding=True, truncation=False, max_length=None,
                     return_tensors=None):
            enc = bert(text, text_pair, padding=padding, truncation=truncation, max_length=max_length,
                       return_tensors=return_tensors)
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    ref = encode_pairs(bert, ["a girl sings loudly ."], ["a girl sings ."], 32)
    got = encode_pairs(NoSegments(), ["a girl sings loudly ."], ["a girl sings ."], 32)
    assert torch.equal(ref[0], got[0])
    for name in ("premise", "hypothesis", "overlap", "negation"):
        assert torch.equal(ref[2][name], got[2][name]), name


# ---------------------------------------------------------------- MNLI

def test_load_mnli_from_jsonl_folder(tmp_path, bert):
    root = mnli_folder(tmp_path / "mnli", extra_val=[{"premise": "x .", "hypothesis": "y .", "label": -1}])
    task = load_mnli(root, tokenizer=bert, max_len=24, cache_dir=str(tmp_path / "cache"))
    assert task.n_classes == 3 and task.label_names == NAMES
    assert task.bias_types == ("overlap", "negation", "cue")
    assert len(task.train) == 30 and len(task.id_test) == 6
    assert task.info["n_unlabelled_dropped"] == {"train": 0, "id_test": 1}
    assert task.train.labels.tolist() == [y for _, _, y in MNLI_TRAIN]
    assert task.train.inputs.shape[1] <= 24 and task.train.attention_mask.shape == task.train.inputs.shape
    val = task.id_test
    assert val.bias_labels["overlap"].tolist() == [0, 0, -1, -1, -1, -1]
    assert val.bias_labels["negation"].tolist() == [-1, -1, 2, 2, -1, -1]
    assert val.bias_labels["cue"].tolist() == [-1] * 6
    assert val.groups.tolist() == [4, 0, 1, 5, 2, 2]  # label * 2 + negation
    assert task.group_names[4] == "contradiction|no_negation"
    assert val.conflicting().tolist() == [True, False, True, False, False, False]
    assert torch.equal(task.ood_test.inputs, val.inputs[[0, 2]])
    assert task.ood_test.labels.tolist() == [2, 0]
    # Token classes: the premise mask spells the premise.
    tokens = bert.convert_ids_to_tokens(val.inputs[2].tolist())
    premise = [t for t, m in zip(tokens, val.token_classes["premise"][2].tolist()) if m]
    assert premise == bert.tokenize(MNLI_VAL[2][0])
    assert val.token_classes["negation"][2].sum() == 1
    assert task.tokenizer is bert and task.pad_id == 0


def test_load_mnli_with_hans_as_ood(tmp_path, bert):
    root = mnli_folder(tmp_path / "mnli")
    hans = hans_tsv(tmp_path / "heuristics_evaluation_set.txt")
    task = load_mnli(root, tokenizer=bert, hans=hans, cache_dir=str(tmp_path / "cache"))
    ood = task.ood_test
    assert len(ood) == 6 and ood.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert task.info["prediction_map"] == {"ood_test": HANS_PREDICTION_MAP}
    assert ood.bias_labels["overlap"].tolist()[:2] == [0, 0]  # every word overlaps in lexical_overlap rows
    names = [task.group_names[g] for g in ood.groups.tolist()]
    assert names[:2] == ["hans:lexical_overlap|entailment", "hans:lexical_overlap|non-entailment"]
    assert names[-1] == "hans:constituent|non-entailment"
    assert len(task.split("conflicting")) == 2


def test_load_mnli_glue_tsv_with_quotes_and_gold_label_strings(tmp_path, bert):
    root = tmp_path / "glue"
    root.mkdir()
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    train = header + "".join(f"{i}\t1\t{i}e\tfiction\t{p}\t{h}\tx\t{NAMES[y]}\n"
                             for i, (p, h, y) in enumerate(MNLI_TRAIN))
    (root / "train.tsv").write_text(train)
    (root / "dev_matched.tsv").write_text(
        header + "0\t1\t0e\tfiction\tthe man 's \" quoted \" hat .\tthe man 's hat .\tx\tentailment\n"
        + "1\t1\t1e\tfiction\ta boy eats an apple .\ta boy is hungry .\tx\t-\n"
        + "2\t1\t2e\tfiction\tthe dog runs .\tthe dog runs fast .\tx\tneutral\n"
    )
    task = load_mnli(root, tokenizer=bert, n=10, cache_dir=str(tmp_path / "cache"))
    assert len(task.train) == 10 and len(task.id_test) == 2
    assert task.id_test.labels.tolist() == [0, 1]
    assert task.info["n_unlabelled_dropped"]["id_test"] == 1
    assert '"' in bert.convert_ids_to_tokens(task.id_test.inputs[0].tolist())
    assert "dev_matched.tsv" in task.info["files"]["validation"]


def test_load_mnli_single_file_and_mapping(tmp_path, bert):
    rows = [{"premise": p, "hypothesis": h, "label": y} for p, h, y in MNLI_TRAIN]
    one = write_jsonl(tmp_path / "all.jsonl", rows)
    task = load_mnli(one, tokenizer=bert, cache_dir=str(tmp_path / "cache"))
    assert len(task.train) == 24 and len(task.id_test) == 6
    val = write_jsonl(tmp_path / "v.jsonl", [{"premise": p, "hypothesis": h, "label": y, "cue": 2}
                                             for p, h, y in MNLI_VAL])
    task = load_mnli({"train": one, "validation_matched": val}, tokenizer=bert, cache_dir=str(tmp_path / "cache"))
    assert task.id_test.bias_labels["cue"].tolist() == [2] * 6
    assert task.train.bias_labels["cue"].tolist() == [-1] * 30


def test_load_mnli_with_the_project_word_tokenizer(tmp_path):
    import circuitkd.data.tokenizer as tokenizer_mod  # part of the package: failing to import is a failure
    vocab = sorted({w for text in all_texts() for w in text.lower().split()})
    tok = tokenizer_mod.WordTokenizer(vocab)
    task = load_mnli(mnli_folder(tmp_path / "mnli"), tokenizer=tok, cache_dir=str(tmp_path / "cache"))
    val = task.id_test
    n_premise = [len(tok.tokenize(p)) for p, _, _ in MNLI_VAL]
    n_hypothesis = [len(tok.tokenize(h)) for _, h, _ in MNLI_VAL]
    assert val.token_classes["premise"].sum(1).tolist() == n_premise
    assert val.token_classes["hypothesis"].sum(1).tolist() == n_hypothesis
    assert val.token_classes["negation"].sum(1).tolist() == [0, 0, 1, 1, 0, 0]  # "not", "n't"


def test_load_mnli_errors(tmp_path, bert):
    with pytest.raises(CircuitKDError, match="data path not found: .*nowhere"):
        load_mnli(tmp_path / "nowhere", tokenizer=bert)
    with pytest.raises(CircuitKDError, match="data file not found: .*missing.jsonl"):
        load_mnli({"train": tmp_path / "missing.jsonl"}, tokenizer=bert)
    only_train = tmp_path / "only_train"
    write_jsonl(only_train / "train.jsonl", [{"premise": "a .", "hypothesis": "b .", "label": 0}])
    with pytest.raises(CircuitKDError, match="lacks the validation split.*validation_matched"):
        load_mnli(only_train, tokenizer=bert, cache_dir=str(tmp_path / "cache"))
    no_cols = tmp_path / "no_cols"
    write_jsonl(no_cols / "train.jsonl", [{"text": "a .", "label": 0}])
    write_jsonl(no_cols / "validation_matched.jsonl", [{"text": "a .", "label": 0}])
    with pytest.raises(CircuitKDError, match="lacks required column.*premise/sentence1, hypothesis/sentence2"):
        load_mnli(no_cols, tokenizer=bert, cache_dir=str(tmp_path / "cache"))
    bad_label = tmp_path / "bad_label"
    mnli_folder(bad_label, extra_val=[{"premise": "a .", "hypothesis": "b .", "label": 7}])
    with pytest.raises(CircuitKDError, match="labels outside the declared classes.*7"):
        load_mnli(bad_label, tokenizer=bert, cache_dir=str(tmp_path / "cache"))
    bad_name = tmp_path / "bad_name"
    mnli_folder(bad_name, extra_val=[{"premise": "a .", "hypothesis": "b .", "label": "maybe"}])
    with pytest.raises(CircuitKDError, match="'maybe'"):
        load_mnli(bad_name, tokenizer=bert, cache_dir=str(tmp_path / "cache"))


def test_hub_names_fail_cleanly_offline(tmp_path, bert, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CircuitKDError, match="could not load 'stanfordnlp/snli'.*local file or folder"):
        load_snli("stanfordnlp/snli", tokenizer=bert, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- HANS

def test_load_hans_original_tsv(tmp_path, bert):
    task = load_hans(hans_tsv(tmp_path / "heuristics_evaluation_set.txt"), tokenizer=bert,
                     cache_dir=str(tmp_path / "cache"))
    assert task.n_classes == 3 and task.info["prediction_map"]["ood_test"] == (0, 1, 1)
    assert len(task.train) == 0 and task.train.inputs.shape[0] == 0
    assert task.id_test.labels.tolist() == [0, 0, 0] and task.ood_test.labels.tolist() == [1, 1, 1]
    assert len(task.split("hans")) == 6
    assert task.group_names[:2] == ("lexical_overlap|entailment", "lexical_overlap|non-entailment")
    assert task.split("hans").groups.tolist() == [0, 1, 2, 3, 4, 5]
    assert task.ood_test.bias_labels["overlap"].tolist() == [0, 0, 0]  # overlap predicts entailment: wrong
    assert task.ood_test.conflicting("overlap").all()
    assert task.info["heuristic_counts"] == {"lexical_overlap": 2, "subsequence": 2, "constituent": 2}


def test_load_hans_hub_format_folder_two_class(tmp_path, bert):
    root = tmp_path / "hans"
    rows = [{"premise": s1, "hypothesis": s2, "label": HANS_LABELS_INT[g], "heuristic": h, "subcase": s}
            for g, s1, s2, h, s in HANS_ROWS]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "validation.jsonl", rows[::-1])
    task = load_hans(root, tokenizer=bert, three_class=False, cache_dir=str(tmp_path / "cache"))
    assert task.n_classes == 2 and task.label_names == ("entailment", "non-entailment")
    assert "prediction_map" not in task.info
    assert len(task.train) == 6 and task.train.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert task.split("hans").labels.tolist() == [1, 0, 1, 0, 1, 0]
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"premise": "a .", "hypothesis": "b .", "label": 0}])
    with pytest.raises(CircuitKDError, match="lacks required column.*heuristic"):
        load_hans(bad, tokenizer=bert, cache_dir=str(tmp_path / "cache"))
    bad_label = hans_tsv(tmp_path / "bad.tsv", rows=[("neutral", "a .", "b .", "constituent", "x")])
    with pytest.raises(CircuitKDError, match="outside the declared classes.*'neutral'"):
        load_hans(bad_label, tokenizer=bert, cache_dir=str(tmp_path / "cache"))


HANS_LABELS_INT = {"entailment": 0, "non-entailment": 1}


# ---------------------------------------------------------------- SNLI

def snli_rows(n: int, seed: int, p_cue: float) -> list[dict]:
    """Rows whose hypothesis holds a label cue word with probability ``p_cue`` (the annotation artefact)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        y = int(i % 3)
        cue_label = y if rng.random() < p_cue else int((y + 1 + rng.integers(2)) % 3)
        rows.append({"premise": "a person is here .", "hypothesis": f"a person is {SNLI_CUES[cue_label]} today .",
                     "label": y, "cue_label": cue_label})
    return rows


def test_load_snli_hard_subset_from_a_hypothesis_only_model(tmp_path, bert):
    root = tmp_path / "snli"
    write_jsonl(root / "snli_1.0_train.jsonl", snli_rows(90, 0, 0.9) + [
        {"premise": "a .", "hypothesis": "a .", "label": -1, "cue_label": 0}])
    write_jsonl(root / "snli_1.0_dev.jsonl", snli_rows(12, 1, 0.9))
    test_rows = snli_rows(24, 2, 0.5)
    write_jsonl(root / "snli_1.0_test.jsonl", test_rows)
    task = load_snli(root, tokenizer=bert, cache_dir=str(tmp_path / "cache"))
    assert task.info["n_unlabelled_dropped"] == {"train": 1, "validation": 0, "test": 0}
    assert task.bias_types == ("hypothesis", "overlap", "negation")
    # The bias model learned the cue words: it predicts each test row's cue label.
    cue = torch.tensor([r["cue_label"] for r in test_rows])
    test = task.split("test")
    assert torch.equal(test.bias_labels["hypothesis"], cue)
    assert task.info["hypothesis_only_acc"]["train"] > 0.85
    hard_rows = cue != test.labels
    assert 0 < int(hard_rows.sum()) < 24
    assert torch.equal(task.ood_test.inputs, test.inputs[hard_rows])
    assert task.info["hypothesis_only_acc"]["hard"] == 0.0
    assert task.group_names[test.groups[hard_rows][0]].endswith("|hard")
    easy = load_snli(root, tokenizer=bert, hard=False, cache_dir=str(tmp_path / "cache"))
    assert len(easy.ood_test) == 24
    assert torch.equal(easy.split("hard").labels, task.ood_test.labels)  # deterministic bias model


def test_fit_hypothesis_only_is_seeded_and_learns():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (200,), generator=g)
    ids = torch.stack([labels + 5, torch.randint(10, 20, (200,), generator=g)], 1)  # token 5+y reveals y
    hyp = torch.ones_like(ids, dtype=torch.bool)
    a = fit_hypothesis_only(ids, hyp, labels, vocab_size=20, epochs=3, seed=1)
    b = fit_hypothesis_only(ids, hyp, labels, vocab_size=20, epochs=3, seed=1)
    assert torch.equal(a.weight.weight, b.weight.weight)
    assert float((a.predict(ids, hyp) == labels).float().mean()) == 1.0
    blind = fit_hypothesis_only(ids, torch.zeros_like(hyp), labels, vocab_size=20, epochs=3, seed=1)
    assert float((blind.predict(ids, hyp) == labels).float().mean()) < 0.6  # no hypothesis, no signal


def test_snli_errors(tmp_path, bert):
    with pytest.raises(CircuitKDError, match="data path not found"):
        load_snli(tmp_path / "no_snli", tokenizer=bert)
    root = tmp_path / "snli"
    write_jsonl(root / "train.jsonl", snli_rows(6, 0, 1.0))
    write_jsonl(root / "dev.jsonl", snli_rows(6, 0, 1.0))
    with pytest.raises(CircuitKDError, match="lacks the test split"):
        load_snli(root, tokenizer=bert, cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------- Waterbirds

WATERBIRDS = [  # (y, split, place): train 8 (6 aligned), val 2, test 6 (3 aligned, 3 minority)
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (1, 0, 1), (1, 0, 1), (1, 0, 1), (0, 0, 1), (1, 0, 0),
    (0, 1, 1), (1, 1, 0),
    (0, 2, 0), (1, 2, 1), (0, 2, 0), (0, 2, 1), (1, 2, 0), (1, 2, 0),
]


def colour_of(i: int) -> tuple[int, int, int]:
    return (10 * i, 255 - 10 * i, 7 * i)


def waterbirds_folder(root: Path) -> Path:
    lines = ["img_id,img_filename,y,split,place,place_filename"]
    for i, (y, split, place) in enumerate(WATERBIRDS):
        rel = f"{'001.Black_footed_Albatross' if y else '002.Sparrow'}/img_{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), colour_of(i)).save(root / rel)
        lines.append(f"{i},{rel},{y},{split},{place},/b/x.jpg")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def test_load_waterbirds(tmp_path):
    root = waterbirds_folder(tmp_path / "waterbird_complete95_forest2water2")
    task = load_waterbirds(root, image_size=8)
    assert task.modality == "image" and task.bias_types == ("place",)
    assert task.group_names == ("landbird|land", "landbird|water", "waterbird|land", "waterbird|water")
    assert [len(task.split(s)) for s in ("train", "id_test", "ood_test", "val")] == [8, 3, 3, 2]
    assert task.train.inputs.shape == (8, 3, 8, 8) and task.train.inputs.dtype == torch.float32
    # Each image is a solid colour: the loaded pixels give back which file was read.
    want = torch.tensor([colour_of(i) for i in range(8)], dtype=torch.float32) / 255.0
    assert torch.allclose(task.train.inputs.mean((2, 3)), want, atol=1e-6)
    assert task.train.labels.tolist() == [y for y, s, _ in WATERBIRDS if s == 0]
    assert torch.equal(task.train.bias_labels["place"], torch.tensor([p for _, s, p in WATERBIRDS if s == 0]))
    assert task.id_test.aligned().all() and task.ood_test.conflicting().all()
    assert task.ood_test.labels.tolist() == [0, 1, 1]
    assert task.ood_test.groups.tolist() == [1, 2, 2]
    assert task.info["group_counts"]["train"] == {"landbird|land": 3, "landbird|water": 1,
                                                  "waterbird|land": 1, "waterbird|water": 3}
    capped = load_waterbirds(root, image_size=8, n=4)
    assert len(capped.train) == 4


def test_waterbirds_errors(tmp_path):
    with pytest.raises(CircuitKDError, match="Waterbirds folder not found: .*nope"):
        load_waterbirds(tmp_path / "nope")
    root = waterbirds_folder(tmp_path / "wb")
    meta = (root / "metadata.csv").read_text()
    (root / "metadata.csv").write_text(meta.replace("place,place_filename", "background,place_filename"))
    with pytest.raises(CircuitKDError, match="lacks required column.*place"):
        load_waterbirds(root)
    (root / "metadata.csv").write_text(meta + "99,002.Sparrow/img_0.png,3,0,0,/b/x.jpg\n")
    with pytest.raises(CircuitKDError, match="'y' has values \\[3\\] outside the declared classes"):
        load_waterbirds(root)
    (root / "metadata.csv").write_text(meta + "99,002.Sparrow/gone.png,0,0,0,/b/x.jpg\n")
    with pytest.raises(CircuitKDError, match="image not found: .*gone.png"):
        load_waterbirds(root)
    (root / "metadata.csv").unlink()
    with pytest.raises(CircuitKDError, match="metadata not found: .*metadata.csv"):
        load_waterbirds(root)


# ---------------------------------------------------------------- CelebA

# (Blond_Hair, Male, partition): blond mostly female, but "not blond" is the majority of both sexes in train.
CELEBA = [
    (1, 0, 0), (1, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (1, 1, 0), (0, 1, 0), (0, 1, 0), (0, 1, 0), (0, 1, 0),
    (1, 0, 1), (0, 1, 1),
    (1, 0, 2), (0, 1, 2), (1, 1, 2), (0, 0, 2),
]


def celeba_folder(root: Path, kaggle: bool) -> Path:
    images = root / "img_align_celeba" / ("img_align_celeba" if kaggle else "")
    images.mkdir(parents=True)
    ids = [f"{i + 1:06d}.jpg" for i in range(len(CELEBA))]
    for i, name in enumerate(ids):
        Image.new("RGB", (18, 22), colour_of(i)).save(images / name, quality=100)
    sign = lambda v: "1" if v else "-1"  # noqa: E731
    if kaggle:
        (root / "list_attr_celeba.csv").write_text(
            "image_id,Smiling,Blond_Hair,Male\n"
            + "".join(f"{n},-1,{sign(b)},{sign(m)}\n" for n, (b, m, _) in zip(ids, CELEBA)))
        (root / "list_eval_partition.csv").write_text(
            "image_id,partition\n" + "".join(f"{n},{p}\n" for n, (_, _, p) in zip(ids, CELEBA)))
    else:
        (root / "list_attr_celeba.txt").write_text(
            f"{len(ids)}\nSmiling Blond_Hair Male\n"
            + "".join(f"{n} -1  {sign(b)} {sign(m)}\n" for n, (b, m, _) in zip(ids, CELEBA)))
        (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, (_, _, p) in zip(ids, CELEBA)))
    return root


@pytest.mark.parametrize("kaggle", [False, True])
def test_load_celeba(tmp_path, kaggle):
    task = load_celeba(celeba_folder(tmp_path / "celeba", kaggle), image_size=6)
    assert task.bias_types == ("Male",)
    assert task.info["bias_map"] == {"not_Male": "Blond_Hair", "Male": "not_Blond_Hair"}
    assert [len(task.split(s)) for s in ("train", "id_test", "ood_test", "val")] == [10, 2, 2, 2]
    assert task.train.inputs.shape == (10, 3, 6, 6)
    want = torch.tensor([colour_of(i) for i in range(10)], dtype=torch.float32) / 255.0
    assert torch.allclose(task.train.inputs.mean((2, 3)), want, atol=0.03)  # JPEG
    assert task.train.labels.tolist() == [b for b, _, p in CELEBA if p == 0]
    assert task.train.bias_labels["Male"].tolist() == [1 - m for _, m, p in CELEBA if p == 0]
    assert task.id_test.labels.tolist() == [1, 0] and task.ood_test.labels.tolist() == [1, 0]
    assert [task.group_names[g] for g in task.ood_test.groups.tolist()] == ["Blond_Hair|Male",
                                                                            "not_Blond_Hair|not_Male"]


def test_celeba_errors(tmp_path):
    root = celeba_folder(tmp_path / "celeba", kaggle=False)
    with pytest.raises(CircuitKDError, match="lacks column\\(s\\) Wavy_Hair; it has \\['Blond_Hair', 'Male'"):
        load_celeba(root, target="Wavy_Hair")
    text = (root / "list_attr_celeba.txt").read_text()
    (root / "list_attr_celeba.txt").write_text(text.replace("000002.jpg -1  1", "000002.jpg -1  2"))
    with pytest.raises(CircuitKDError, match="'Blond_Hair' has values \\[2\\] outside the declared classes"):
        load_celeba(root)
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(CircuitKDError, match="partition list not found: .*list_eval_partition.csv"):
        load_celeba(root)
    with pytest.raises(CircuitKDError, match="CelebA folder not found"):
        load_celeba(tmp_path / "missing")
