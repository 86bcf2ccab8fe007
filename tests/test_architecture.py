"""Each concept has one home: import rules between the layers, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "blackbox_proxy"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, resolved to ``blackbox_proxy.x.y`` names for relative imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "adapters":
        parts = ["blackbox_proxy", *parts]
    package = parts[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _files(*globs: str) -> list[Path]:
    return sorted({p for g in globs for p in ROOT.glob(g)})


def test_evaluation_does_not_redo_the_engine() -> None:
    for f in _files("blackbox_proxy/evaluation/*.py"):
        bad = {m for m in _imports(f) if m in ("blackbox_proxy.combine", "blackbox_proxy.candidates")}
        assert not bad, f"{f.name} imports {bad}: derive answers through blackbox_proxy.rerank"


def test_training_does_not_depend_on_evaluation() -> None:
    for f in _files("blackbox_proxy/training*.py", "blackbox_proxy/corpus.py"):
        bad = {m for m in _imports(f) if m.startswith("blackbox_proxy.evaluation")}
        assert not bad, f"{f.name} imports {bad}"


def test_jsonl_is_read_in_one_place() -> None:
    """Only files.py splits a file into JSON lines; everything else calls files.iter_jsonl."""
    for f in _files("blackbox_proxy/**/*.py", "adapters/*.py"):
        if f.name == "files.py":
            continue
        text = f.read_text(encoding="utf-8")
        for i, line in enumerate(text.splitlines(), 1):
            if "json.loads(" in line and ("for " in line or "line" in line):
                raise AssertionError(
                    f"{f.relative_to(ROOT)}:{i} parses JSON lines itself: use files.iter_jsonl"
                )


def test_one_pair_class_and_one_loader() -> None:
    from blackbox_proxy import decoding, experts, models

    assert decoding.ProxyPair is experts.ExpertPair
    assert (
        decoding.load_model.__module__ == "blackbox_proxy.decoding"
    )  # a thin re-export of models.load_model
    for f in _files("blackbox_proxy/**/*.py", "adapters/*.py"):
        if f.name in ("models.py", "transformers_local.py"):
            continue
        assert "from_pretrained(" not in f.read_text(encoding="utf-8") or f.name.startswith("training"), (
            f"{f.name} loads weights itself: use models.load_model"
        )
    assert callable(models.load_model)


def test_commands_build_providers_through_the_registry() -> None:
    for f in _files("blackbox_proxy/commands/*.py"):
        text = f.read_text(encoding="utf-8")
        assert "OpenAIChatProvider(" not in text and "OpenAICompletionsProvider(" not in text, (
            f"{f.name} builds a provider itself: use options.build_provider (the registry)"
        )
        assert "getattr(provider" not in text
