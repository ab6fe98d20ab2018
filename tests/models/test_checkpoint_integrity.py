"""Issue 16: checkpoints you can trust: a manifest of sha256s, verified on load, naming the damaged file."""
import json

import pytest
import torch

from circuitkd.config import ModelSpec
from circuitkd.errors import CircuitKDError
from circuitkd.models import build_model, class_logits, load_checkpoint, save_checkpoint
from circuitkd.models import checkpoint as ckpt

SPEC = ModelSpec.preset("tiny", d_vocab=30, n_ctx=12, n_classes=3)


@pytest.fixture
def saved(tmp_path):
    model = build_model(SPEC)
    save_checkpoint(model, tmp_path / "m", config={"note": "x"})
    return tmp_path / "m", model


def test_save_writes_a_manifest_with_spec_and_sha256(saved):
    path, model = saved
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["spec"] == SPEC.to_dict()
    assert set(manifest["files"]) == {"model.pt", "spec.json", "config.json"}
    import hashlib

    assert manifest["files"]["model.pt"] == hashlib.sha256((path / "model.pt").read_bytes()).hexdigest()
    x = torch.randint(0, 30, (2, 9))
    assert torch.equal(class_logits(load_checkpoint(path), x), class_logits(model, x))


def test_truncated_model_pt(saved):
    path, _ = saved
    data = (path / "model.pt").read_bytes()
    (path / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CircuitKDError, match=r"model.pt is damaged \(its sha256 does not match manifest.json\)"):
        load_checkpoint(path)
    assert not ckpt.is_checkpoint(path)  # a re-run retrains it instead of trusting it


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage"], ids=["empty", "garbage"])
def test_empty_or_truncated_model_pt_without_a_manifest(saved, content):
    path, _ = saved
    (path / "manifest.json").unlink()
    (path / "model.pt").write_bytes(content)
    with pytest.raises(CircuitKDError, match=r"model.pt cannot be read"):
        load_checkpoint(path)


def test_invalid_spec_json(saved):
    path, _ = saved
    (path / "spec.json").write_text('{"backbone": "native", "n_layers": ')
    with pytest.raises(CircuitKDError, match=r"spec.json is damaged"):
        load_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CircuitKDError, match=r"spec.json is not valid JSON"):
        load_checkpoint(path)
    (path / "spec.json").write_text('{"backbone": "native", "bogus": 1}')
    with pytest.raises(CircuitKDError, match=r"spec.json is not a valid model spec \(unknown ModelSpec field"):
        load_checkpoint(path)


def test_damaged_manifest_and_missing_files(saved):
    path, _ = saved
    (path / "config.json").unlink()
    with pytest.raises(CircuitKDError, match=r"config.json is missing \(listed in its manifest.json\)"):
        load_checkpoint(path)
    (path / "manifest.json").write_text("{nope")
    with pytest.raises(CircuitKDError, match=r"manifest.json is damaged"):
        load_checkpoint(path)


def test_checkpoint_folder_holding_another_architecture(saved):
    path, _ = saved
    with pytest.raises(CircuitKDError, match=r"holds a different model \(.*backbone: stored 'native', wanted 'bert'"):
        load_checkpoint(path, expect=ModelSpec.preset("bert-student", d_vocab=30, n_ctx=12, n_classes=3))
    with pytest.raises(CircuitKDError, match=r"holds a different model \(d_model: stored 32, wanted 64"):
        load_checkpoint(path, expect=SPEC.replace(d_model=64))
    load_checkpoint(path, expect=SPEC.replace(n_classes=None, seed=7))  # sizes left open match anything


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    """Run folders are shared: a file or model folder written through a temporary one gets what
    ``open``/``mkdir`` would give it under the umask, not tempfile's owner-only 0600/0700."""
    import os
    import stat

    from circuitkd.models.checkpoint import atomic_write_dir, atomic_write_text

    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "summary.md", "x")
        d = atomic_write_dir(tmp_path / "model", lambda tmp: (tmp / "w.txt").write_text("y"))
        assert stat.S_IMODE(f.stat().st_mode) == 0o644
        assert stat.S_IMODE(d.stat().st_mode) == 0o755
        os.umask(0o077)
        g = atomic_write_text(tmp_path / "private.md", "z")
        assert stat.S_IMODE(g.stat().st_mode) == 0o600
    finally:
        os.umask(old)
