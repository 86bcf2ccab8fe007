"""Bad input is refused at the edge with one clear line: questions, flags, model files, output paths."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from blackbox_proxy.cli import main
from blackbox_proxy.errors import InputError, ModelSpecError
from blackbox_proxy.model_checks import check_gguf_file, check_model_folder, check_safetensors
from blackbox_proxy.types import MCQuestion

pytestmark = pytest.mark.timeout(60)


# -- MCQuestion: checked, never coerced --------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"answer": "1"}, r"answer must be the 0-based index.*got str '1'"),
        ({"answer": True}, r"answer must be the 0-based index.*got bool True"),
        ({"answer": 1.0}, r"answer must be the 0-based index.*got float 1.0"),
        ({"answer": 3}, r"answer index 3 out of range for 3 choices"),
        ({"choices": "abcd"}, r"choices must be a list of strings, got str 'abcd'"),
        ({"choices": {"A": "x", "B": "y"}}, r"choices must be a list of strings, got dict"),
        ({"choices": {"x", "y"}}, r"choices must be a list of strings, got set"),
        ({"choices": 4}, r"choices must be a list of strings, got int 4"),
        ({"choices": [{"text": "x"}, {"text": "y"}]}, r"choice 0 must be a string, got dict \{'text': 'x'\}"),
        ({"choices": ["x", None]}, r"choice 1 must be a string, got NoneType None"),
        ({"choices": ["x", 2]}, r"choice 1 must be a string, got int 2"),
        ({"question": None}, r"question text must be a string, got NoneType None"),
        ({"question": 42}, r"question text must be a string, got int 42"),
        ({"question": "  "}, r"empty question text"),
        ({"id": None}, r"question id must be a non-empty string, got None"),
        ({"id": 7}, r"question id must be a non-empty string, got 7"),
        ({"id": ""}, r"question id must be a non-empty string"),
        ({"meta": ["week"]}, r"meta must be a mapping, got list"),
    ],
)
def test_bad_questions_are_refused(kwargs: dict, match: str) -> None:
    fields = {"id": "q1", "question": "Which?", "choices": ("x", "y", "z"), "answer": 0, **kwargs}
    with pytest.raises(InputError, match=match) as info:
        MCQuestion(**fields)
    assert "\n" not in str(info.value)


def test_good_questions_are_normalised_not_changed() -> None:
    q = MCQuestion("q1", "Which?", ["x", "y"], np.int64(1), {"week": "2025-01-03"})
    assert q.choices == ("x", "y") and q.answer == 1 and type(q.answer) is int
    assert MCQuestion("q2", "Which?", (c for c in ("a", "b"))).choices == ("a", "b")
    assert MCQuestion("q3", "Which?", ("a", "b"), None).gold_letter is None


def test_a_huge_repr_is_cut_in_the_message() -> None:
    with pytest.raises(InputError) as info:
        MCQuestion("q", "Which?", "x" * 10_000)
    assert len(str(info.value)) < 200


# -- CLI: one line on stderr, exit 2, no traceback ---------------------------------------------------
def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["serve", "smollm2", "--threads", "0"], "--threads: must be at least 1"),
        (["serve", "smollm2", "--port", "70000"], "--port: must be a TCP port"),
        (["serve", "smollm2", "--n-ctx", "-5"], "--n-ctx: must be at least 1"),
        (["train-expert", "b", "d", "--out", "o", "--lr", "nan"], "--lr: must be a finite number above 0"),
        (
            ["train-expert", "b", "d", "--out", "o", "--epochs", "-1"],
            "--epochs: must be a finite number above 0",
        ),
        (["train-expert", "b", "d", "--out", "o", "--lora-dropout", "1"], "--lora-dropout: must be below 1"),
        (["train-expert", "b", "d", "--out", "o", "--batch-size", "0"], "--batch-size: must be at least 1"),
    ],
)
def test_bad_flag_values_are_one_line(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_cli(argv, capsys)
    assert code == 2 and match in one_error_line(err), err


@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf", "ten"])
def test_timeout_must_be_a_positive_number(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_cli(["mc", "q.jsonl", "--out", "o.csv", "--timeout", value], capsys)
    assert code == 2 and "--timeout" in one_error_line(err), err


def test_models_path_of_a_missing_gguf_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = run_cli(["models", "path", str(tmp_path / "bad.gguf")], capsys)
    assert code == 2 and "does not exist" in one_error_line(err)


def test_models_path_of_a_file_that_is_not_gguf_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("this is not a model\n")
    code, err = run_cli(["models", "path", str(bad)], capsys)
    assert code == 2 and "is not a GGUF model file" in one_error_line(err)


def _gguf_header(tensors: list[tuple[str, list[int], int]], alignment: int = 32) -> bytes:
    """A minimal GGUF v3 header: one string KV and F32 tensors (name, dims, offset)."""

    def s(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1)
    out += s("general.name") + struct.pack("<I", 8) + s("tiny")
    for name, dims, offset in tensors:
        out += s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", 0, offset)  # type 0 = F32
    return out + b"\0" * (-len(out) % alignment)


def test_a_truncated_gguf_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    head = _gguf_header([("a", [4, 4], 0), ("b", [8], 64)])
    full = tmp_path / "full.gguf"
    full.write_bytes(head + b"\1" * (64 + 32))
    assert check_gguf_file(full) == full  # exactly as long as its header says
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head + b"\1" * 70)
    with pytest.raises(ModelSpecError, match=r"is truncated: .* \(26 missing\)"):
        check_gguf_file(cut)
    code, err = run_cli(["models", "path", str(cut)], capsys)
    assert code == 2 and "is truncated" in one_error_line(err)
    short = tmp_path / "short.gguf"
    short.write_bytes(head[:30])
    with pytest.raises(ModelSpecError, match="truncated inside its header"):
        check_gguf_file(short)


def _expert_folder(root: Path, *, tokenizer: bool = True) -> Path:
    from safetensors.numpy import save_file

    folder = root / "expert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(
        {"w": np.ones((64, 64), dtype=np.float32), "b": np.zeros(64, dtype=np.float32)},
        folder / "model.safetensors",
    )
    if tokenizer:
        (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    return folder


def test_a_complete_expert_folder_passes(tmp_path: Path) -> None:
    folder = _expert_folder(tmp_path)
    assert check_model_folder(folder) == folder
    assert check_safetensors(folder / "model.safetensors") == 2


def test_a_truncated_safetensors_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = _expert_folder(tmp_path)
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    with pytest.raises(ModelSpecError, match=r"model.safetensors is truncated: .*\(1000 missing\)"):
        check_model_folder(folder)
    code, err = run_cli(["models", "path", str(folder)], capsys)
    assert code == 2 and "is truncated" in one_error_line(err)
    w.write_bytes(b"\x10\x00")
    with pytest.raises(ModelSpecError, match="not even a header"):
        check_model_folder(folder)


def test_an_expert_folder_without_tokenizer_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = _expert_folder(tmp_path, tokenizer=False)
    code, err = run_cli(["models", "path", str(folder)], capsys)
    assert code == 2 and "has no tokenizer" in one_error_line(err)


def test_an_expert_folder_with_missing_shards_or_weights(tmp_path: Path) -> None:
    folder = _expert_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelSpecError, match="has no weights"):
        check_model_folder(folder)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-1.safetensors"}})
    )
    with pytest.raises(ModelSpecError, match="1 of 1 weight shards .* missing"):
        check_model_folder(folder)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(ModelSpecError, match="config.json is not valid JSON"):
        check_model_folder(folder)


def test_train_expert_refuses_a_bad_base_folder_before_loading(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    folder = _expert_folder(tmp_path, tokenizer=False)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    code, err = run_cli(["train-expert", str(folder), str(data), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "has no tokenizer" in one_error_line(err)
    code, err = run_cli(["train-expert", str(folder), str(data), "--out", str(data)], capsys)
    assert code == 2 and "is a file" in one_error_line(err)


def test_build_corpus_into_a_directory_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = run_cli(
        ["build-corpus", "--data-dir", str(tmp_path / "nope"), "--weeks", "2025-01", "--out", str(tmp_path)],
        capsys,
    )
    assert code == 2 and "is a directory; give a file name" in one_error_line(err)


def test_build_corpus_into_an_unwritable_place_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(
        [
            "build-corpus",
            "--data-dir",
            str(tmp_path),
            "--weeks",
            "2025-01",
            "--out",
            str(blocker / "c.jsonl"),
        ],
        capsys,
    )
    assert code == 2 and "cannot create folder" in one_error_line(err)
