"""The README's config table against the config schema, so the two cannot drift apart: every key
the schema knows is in the table (top-level keys as rows, the keys of a section named in its
row), and the table names no key the schema does not know."""

from __future__ import annotations

import re
from typing import Any

from conftest import REPO
from neuroscribe.config import config_schema

# the composed schema: the workflow's keys and each registered method's section and stages
SCHEMA = config_schema()
README = (REPO / "README.md").read_text()


def _table() -> dict[str, str]:
    """Config table rows: each key of the first column (e.g. `targets[].spec`) → its row."""
    start = README.index("| key | what |")
    rows = {}
    for line in README[start:].split("\n\n", 1)[0].splitlines()[2:]:
        first, _, text = line.strip("|").partition("|")
        for key in re.findall(r"`([^`]+)`", first):
            rows[key] = text
    return rows


def _properties(node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node.get("properties", {})


def _named(text: str) -> set[str]:
    """Words written as code in a row: `key`, and the keys of `key: value` and {a, b} forms."""
    named = set()
    for code in re.findall(r"`([^`]+)`", text):
        named |= set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code))
    return named


def test_every_top_level_key_has_a_row_and_every_row_a_key() -> None:
    sections = {key.split(".")[0].removesuffix("[]") for key in _table()}
    assert sections == set(SCHEMA["properties"])


def test_each_section_row_names_every_key_of_its_section() -> None:
    table = _table()
    sections = {
        "captioner": _properties(SCHEMA["properties"]["captioner"]),
        "llm": _properties(SCHEMA["properties"]["llm"]),
        "dnd": _properties(SCHEMA["properties"]["dnd"]),
        "evaluation": _properties(SCHEMA["properties"]["evaluation"]),
        "clipdissect": _properties(SCHEMA["properties"]["clipdissect"]),
        "tellme": _properties(SCHEMA["properties"]["tellme"]),
        "texplain": _properties(SCHEMA["properties"]["texplain"]),
    }
    for name, keys in sections.items():
        missing = set(keys) - _named(table[name])
        assert not missing, f"README row `{name}` does not name {sorted(missing)}"
    dnd = sections["dnd"]
    for nested in (dnd["synthesizer"], dnd["scoring"], dnd["scoring"]["properties"]["similarity"]):
        assert set(_properties(nested)) <= _named(table["dnd"])
    tellme = sections["tellme"]
    for nested in (tellme["simulator"], tellme["weights"]):
        assert set(_properties(nested)) <= _named(table["tellme"])
    texplain = sections["texplain"]
    for nested in ("lm", "translator", "train", "sampling", "direction"):
        assert set(_properties(texplain[nested])) <= _named(table["texplain"])
    resources = _properties(SCHEMA["properties"]["resources"])
    stage_keys = set(_properties(next(iter(resources.values()))))
    assert set(resources) | stage_keys <= _named(table["resources.<stage>"])


def test_target_layer_and_dataset_keys_are_all_in_the_table() -> None:
    table = _table()
    target = _properties({"$ref": "#/$defs/target"})
    rows = " ".join(text for key, text in table.items() if key.startswith("targets[]"))
    named = _named(rows) | {k.split(".")[-1].removesuffix("[]") for k in table}
    assert set(target) <= named
    layer = SCHEMA["$defs"]["layer"]["anyOf"][1]["properties"]
    assert set(layer) <= _named(table["targets[].layers[]"])
    dataset = _properties({"$ref": "#/$defs/dataset"})
    assert set(dataset) <= _named(table["probe.datasets[]"])
