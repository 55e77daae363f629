"""Prompt files of Describe-and-Dissect's `reference` mode, and their extraction from the authors' code.

A prompt file (YAML) holds the texts of the paper's three requests; the code holds only their
structure. neuroscribe ships its own texts (`prompts/neuroscribe.yaml`, in its own words). The
authors' texts cannot be shipped (their repository has no license), so a user who wants them
extracts them from a local clone of their code:

    python -m neuroscribe.methods.dnd.extract_prompts path/to/Describe-and-Dissect prompts.yaml

and points `dnd.prompts` at the file. Each request is a list of few-shot exchanges (sent as
user/assistant turns) and a template, the last user turn, with one placeholder:

- `simplify`: one request per caption; `{caption}` is the caption.
- `summarise`: one request per candidate; `{descriptions}` is the simplified captions, joined.
- `reask`: sent alone when a summary lists several concepts; `{descriptions}` is the list.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT = Path(__file__).with_name("prompts") / "neuroscribe.yaml"
PLACEHOLDERS = {"simplify": "{caption}", "summarise": "{descriptions}", "reask": "{descriptions}"}


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable or not shaped as a prompt file; the message says how
    to fix it."""


@dataclass(frozen=True)
class Exchange:
    """A few-shot example: a user turn and the assistant's answer."""

    user: str
    assistant: str


@dataclass(frozen=True)
class Prompt:
    """One request: its few-shot exchanges, then the template of its last user turn."""

    examples: tuple[Exchange, ...]
    template: str
    placeholder: str

    def messages(self, value: str) -> list[tuple[str, str]]:
        """(role, text) turns: the examples, then the template with `value` in its placeholder."""
        turns: list[tuple[str, str]] = []
        for example in self.examples:
            turns += [("user", example.user), ("assistant", example.assistant)]
        turns.append(("user", self.template.replace(self.placeholder, value)))
        return turns


@dataclass(frozen=True)
class PromptSet:
    """The texts of the reference mode's three requests, and where they came from."""

    name: str
    source: str
    simplify: Prompt
    summarise: Prompt
    reask: Prompt


def _prompt(path: Path, data: dict[str, Any], key: str) -> Prompt:
    where = f"prompt file {path}: `{key}`"
    entry = data.get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get("template"), str):
        raise PromptFileError(f"{where} must be a mapping with a `template` string")
    placeholder = PLACEHOLDERS[key]
    if entry["template"].count(placeholder) != 1:
        raise PromptFileError(
            f"{where}.template must hold {placeholder} exactly once (where the text goes); "
            f"it holds it {entry['template'].count(placeholder)} times"
        )
    examples = entry.get("examples") or []
    if not isinstance(examples, list) or not all(
        isinstance(e, dict)
        and set(e) == {"user", "assistant"}
        and all(isinstance(v, str) for v in e.values())
        for e in examples
    ):
        raise PromptFileError(
            f"{where}.examples must be a list of {{user: TEXT, assistant: TEXT}} pairs"
        )
    return Prompt(tuple(Exchange(**e) for e in examples), entry["template"], placeholder)


def load_prompts(path: str | Path | None) -> PromptSet:
    """The prompt file at `path` (None: neuroscribe's own), checked."""
    path = Path(path) if path is not None else DEFAULT
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PromptFileError(
            f"prompt file {path} does not exist; extract the authors' texts into it with "
            f"`python -m neuroscribe.methods.dnd.extract_prompts CLONE {path}` (CLONE: a clone "
            "of github.com/Trustworthy-ML-Lab/Describe-and-Dissect), or set dnd.prompts to null "
            "for neuroscribe's own texts"
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise PromptFileError(f"prompt file {path} cannot be read as YAML: {err}") from err
    if not isinstance(data, dict):
        raise PromptFileError(f"prompt file {path} must be a mapping (simplify, summarise, reask)")
    unknown = sorted(set(data) - {"source", *PLACEHOLDERS})
    if unknown:
        raise PromptFileError(
            f"prompt file {path}: unknown key {unknown[0]!r}; it takes source, "
            + ", ".join(PLACEHOLDERS)
        )
    return PromptSet(
        name=path.stem,
        source=str(data.get("source", path.name)),
        **{key: _prompt(path, data, key) for key in PLACEHOLDERS},
    )


def file_digest(path: str | Path | None) -> str:
    """sha256 of a prompt file's bytes (None: neuroscribe's own), so an edit reruns the stage."""
    return hashlib.sha256((Path(path) if path is not None else DEFAULT).read_bytes()).hexdigest()


def write_prompts(prompts: dict[str, Any], out: str | Path) -> Path:
    """Write a prompt-file mapping as YAML (texts kept byte for byte) and check it loads."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(prompts, sort_keys=False, allow_unicode=True, width=float("inf"))
    partial = out.with_name(out.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    load_prompts(partial)
    partial.replace(out)
    return out
