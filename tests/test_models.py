"""Model spec resolution, checksum verification and the `models` CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from blackbox_proxy import models
from blackbox_proxy.errors import ChecksumError, ModelSpecError


def test_resolve_kinds(tmp_path):
    assert models.resolve("smollm2-135m-instruct").kind == "packaged"
    assert models.resolve("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert models.resolve(tmp_path / "m").kind == "dir"
    g = tmp_path / "x.gguf"
    g.write_bytes(b"GGUF")
    src = models.resolve(g)
    assert src.kind == "gguf" and src.gguf == g.resolve()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-model", "unknown model spec"),
        ("./missing/file.gguf", "does not exist"),
        ("", "empty model spec"),
    ],
)
def test_unknown_specs_raise_clear_errors(spec, message):
    with pytest.raises(ModelSpecError, match=message):
        models.resolve(spec)


def test_folder_without_weights_is_rejected(tmp_path):
    with pytest.raises(ModelSpecError, match="config.json"):
        models.resolve(tmp_path)


def test_sha256_mismatch_is_detected_and_a_match_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("BLACKBOX_PROXY_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.gguf"
    f.write_bytes(b"weights")
    good = models.sha256_file(f)
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        models.verify_sha256(f, "0" * 64)
    models.verify_sha256(f, good)
    assert list((tmp_path / "cache" / "verified").iterdir())
    f.write_bytes(b"tampered")  # size/mtime change invalidates the remembered check
    with pytest.raises(ChecksumError):
        models.verify_sha256(f, good)


def test_packaged_model_with_tampered_package_file_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("BLACKBOX_PROXY_CACHE", str(tmp_path / "cache"))
    m = models.PACKAGED["smollm2-135m-instruct"]
    fake = tmp_path / m.filename
    fake.write_bytes(b"not the model")
    bad = models.PackagedModel(
        m.name, m.filename, m.sha256, m.vocab_size, m.license, m.install, m.module, lambda _m: fake
    )
    with pytest.raises(ChecksumError):
        bad.gguf()


def test_missing_package_names_its_install_command(monkeypatch):
    m = models.PACKAGED["gemma-3-270m"]
    broken = models.PackagedModel(
        m.name,
        m.filename,
        m.sha256,
        m.vocab_size,
        m.license,
        m.install,
        "no_such_module_xyz",
        models._smollm2,
    )
    with pytest.raises(ModelSpecError, match="pip install"):
        broken.gguf()


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "blackbox_proxy.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_models_list_and_gguf_path_cli():
    r = _cli("models", "list")
    assert r.returncode == 0, r.stderr
    for name in models.PACKAGED:
        assert name in r.stdout
    r = _cli("models", "path", "smollm2-135m-instruct", "--gguf")
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip().splitlines()[-1])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.exists()
    r = _cli("models", "path", "nope-model")
    assert r.returncode == 2 and "unknown model spec" in r.stderr


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_models_path_prints_a_loadable_safetensors_folder():
    r = _cli("models", "path", "smollm2-135m-instruct")
    assert r.returncode == 0, r.stderr
    folder = Path(r.stdout.strip().splitlines()[-1])
    assert (folder / "config.json").exists()
    assert any(folder.glob("*.safetensors"))
    assert "quantization_config" not in (folder / "config.json").read_text()


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_gguf_path_spec_and_packaged_name_give_the_same_weights():
    import torch

    m1, tok1 = models.load_causal_lm("smollm2-135m-instruct")
    m2, tok2 = models.load_causal_lm(models.gguf_path("smollm2-135m-instruct"))
    ids = tok1("The capital of France is", return_tensors="pt").input_ids
    assert tok1.get_vocab() == tok2.get_vocab()
    with torch.inference_mode():
        assert torch.allclose(m1(ids).logits, m2(ids).logits)
