"""Docs match the code (datasette-style meta-tests): every hook documented and tested, every
component and config key documented, every recipe key in the reference, every bundled recipe valid."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from instructrl.core import hookspecs
from instructrl.core.config import bundled_recipes, load_recipe, stage_sections
from instructrl.core.registry import KINDS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TESTS = ROOT / "tests"


def read(name: str) -> str:
    return (DOCS / name).read_text()


def all_test_text() -> str:
    return "\n".join(p.read_text() for p in TESTS.rglob("test_*.py"))


HOOKS = [k.hook for k in KINDS.values()]


def test_every_hookspec_is_a_kind():
    declared = {n for n in dir(hookspecs) if n.startswith("register_")}
    assert declared == set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented_and_tested(hook):
    assert f"`{hook}(register)`" in read("plugins.md"), f"{hook} is not documented in docs/plugins.md"
    # a test implements it (a plugin object in a test) or drives it (the built-ins' registrations)
    assert re.search(rf"def {hook}\(|{hook}", all_test_text()), f"{hook} has no test"


def test_every_component_and_its_keys_are_documented(registry):
    text = read("components.md")
    sections = re.split(r"\n## ", text)
    for kind in KINDS:
        section = next((s for s in sections if f"Kind `{kind}`" in s), None)
        assert section is not None, f"docs/components.md has no section for kind {kind}"
        for name in registry.names(kind):
            assert f"### `{name}`" in section, f"{kind} '{name}' is not documented"
            spec = registry.get(kind, name)
            for f in dataclasses.fields(spec.config) if spec.config else []:
                assert f"| `{f.name}` |" in section, f"{kind} '{name}' key '{f.name}' is not documented"


def test_every_recipe_key_is_in_the_reference(registry):
    text = read("recipes.md")
    for section, cls in stage_sections(registry).items():
        for f in dataclasses.fields(cls):
            assert f"`{section}.{f.name}`" in text, f"{section}.{f.name} is missing from docs/recipes.md"


@pytest.mark.parametrize("name", list(bundled_recipes()))
@pytest.mark.parametrize("smoke", [False, True])
def test_every_bundled_recipe_validates(name, smoke):
    recipe = load_recipe(name, smoke=smoke)
    assert recipe.stages
    assert recipe.cfg.description


def test_docs_index_links_exist():
    readme = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link
