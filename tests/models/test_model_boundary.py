"""The model boundary (issue 17): outside its own folder, no product module imports a model family; shared code
reaches families only through ``pretrain.models.registry``."""
from __future__ import annotations

import ast
from pathlib import Path

from pretrain.models import registry

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("pretrain", "parallel", "common", "data_pipeline", "benchmarks")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_no_module_outside_a_family_folder_imports_a_family():
    families = registry.names()
    assert families == ("qwen2", "qwen3")
    offenders = []
    for top in PRODUCT:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT)
            own = rel.parts[:3] if rel.parts[:2] == ("pretrain", "models") else ()
            for name in _imports(path):
                for family in families:
                    package = f"pretrain.models.{family}"
                    inside = own == ("pretrain", "models", family)
                    if (name == package or name.startswith(package + ".")) and not inside:
                        offenders.append(f"{rel}: {name}")
    assert not offenders, "family imported outside its folder (use pretrain.models.registry):\n" + "\n".join(offenders)


def test_every_family_declares_what_shared_code_asks_for():
    for name in registry.names():
        family = registry.get(name)
        assert family.name == name
        adapter = family.adapter()
        for fn in ("global_from_hf", "hf_from_global", "hf_vocab_rows"):
            assert callable(getattr(adapter, fn)), f"{name}'s state-dict adapter lacks {fn}"
        for model_type in family.hf_model_types:
            assert registry.family_of_hf(model_type) is family
