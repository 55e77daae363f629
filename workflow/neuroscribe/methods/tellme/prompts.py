"""TeLLMe's prompt files: the texts of the explainer's requests, in YAML (see
`prompts/neuroscribe.yaml`, neuroscribe's own texts, for the shape).

The code holds only the structure: a system message, few-shot neurons (each a listing and the
explanation the assistant gave), then the neuron's own listing in a template. Items are listed
`item<TAB>value`, weakest first, as the reference lists them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT = Path(__file__).with_name("prompts") / "neuroscribe.yaml"
SOURCES = ("activations", "weights")
MODES = ("reference", "compact")
LISTING = "{listing}"


class PromptFileError(ValueError):
    """A prompt file is missing or not shaped as one; the message says what to fix."""


@dataclass(frozen=True)
class Example:
    listing: tuple[tuple[str, int], ...]
    explanation: str


@dataclass(frozen=True)
class ExplainPrompt:
    system: str
    examples: tuple[Example, ...]
    template: str

    def messages(
        self, neuron: int | str, items: Sequence[tuple[str, int]], json_suffix: str | None = None
    ) -> list[dict[str, str]]:
        """The chat: system, the few-shot neurons (named by letters, so no number clashes with
        the real neuron's), then the neuron's own listing."""
        turns = [{"role": "system", "content": self.system}]
        for i, example in enumerate(self.examples):
            name = chr(ord("A") + i)
            turns.append({"role": "user", "content": self.render(name, example.listing)})
            turns.append({"role": "assistant", "content": example.explanation})
        last = self.render(neuron, items)
        if json_suffix:
            last = f"{last}\n\n{json_suffix}"
        turns.append({"role": "user", "content": last})
        return turns

    def render(self, neuron: int | str, items: Sequence[tuple[str, int]]) -> str:
        listing = _listing(items)
        return self.template.replace("{neuron}", str(neuron)).replace("{listing}", listing)


@dataclass(frozen=True)
class BatchedPrompt:
    """Several neurons in one request: a system text, a block per neuron, an instruction."""

    system: str
    neuron: str
    instruction: str

    def messages(
        self, neurons: Sequence[tuple[int, Sequence[tuple[str, int]]]], k: int
    ) -> list[dict[str, str]]:
        blocks = [
            self.neuron.replace("{neuron}", str(n)).replace("{listing}", _listing(items))
            for n, items in neurons
        ]
        user = "\n\n".join([*blocks, self.instruction.replace("{k}", str(k))])
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]


@dataclass(frozen=True)
class PromptSet:
    path: str
    prompts: dict[tuple[str, str], ExplainPrompt]
    json: str
    batched: dict[str, BatchedPrompt]

    def get(self, source: str, mode: str) -> ExplainPrompt:
        return self.prompts[(source, mode)]

    def json_suffix(self, k: int) -> str:
        return self.json.replace("{k}", str(k))


def _listing(items: Sequence[tuple[str, int]]) -> str:
    """`item<TAB>value` lines, weakest first (ties in the given order)."""
    ordered = sorted(items, key=lambda item: item[1])
    return "\n".join(f"{_one_line(text)}\t{int(value)}" for text, value in ordered)


def _one_line(text: str) -> str:
    # a caption with a tab or newline would break the listing's lines
    return " ".join(str(text).split())


def _prompt(path: Path, data: Any, where: str) -> ExplainPrompt:
    if not isinstance(data, dict):
        raise PromptFileError(f"prompt file {path}: `{where}` must be a mapping")
    unknown = set(data) - {"system", "examples", "template"}
    if unknown:
        raise PromptFileError(f"prompt file {path}: `{where}` has unknown keys {sorted(unknown)}")
    template, system = data.get("template"), data.get("system", "")
    if not isinstance(template, str) or not isinstance(system, str):
        raise PromptFileError(f"prompt file {path}: `{where}` needs a `template` string")
    if template.count(LISTING) != 1:
        raise PromptFileError(
            f"prompt file {path}: `{where}.template` must hold {LISTING} exactly once (where "
            "the items go; {neuron}, the neuron's number, is optional)"
        )
    examples = []
    for i, example in enumerate(data.get("examples") or []):
        try:
            listing = tuple((str(text), int(value)) for text, value in example["listing"])
            examples.append(Example(listing, str(example["explanation"])))
        except (KeyError, TypeError, ValueError):
            raise PromptFileError(
                f"prompt file {path}: `{where}.examples[{i}]` must have `listing` (a list of "
                "[text, value 0-10] pairs) and `explanation`"
            ) from None
    return ExplainPrompt(system, tuple(examples), template)


def load_prompts(path: str | Path | None = None) -> PromptSet:
    """The prompt file at `path` (None: neuroscribe's own); PromptFileError says what is wrong."""
    file = Path(path) if path is not None else DEFAULT
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as err:
        raise PromptFileError(f"cannot read prompt file {file}: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise PromptFileError(f"prompt file {file} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise PromptFileError(f"prompt file {file} must be a mapping with {list(SOURCES)}")
    unknown = set(data) - {*SOURCES, "json", "batched"}
    if unknown:
        raise PromptFileError(f"prompt file {file} has unknown keys {sorted(unknown)}")
    prompts = {}
    for source in SOURCES:
        section = data.get(source)
        if not isinstance(section, dict) or set(section) != set(MODES):
            raise PromptFileError(f"prompt file {file}: `{source}` must hold {list(MODES)}")
        for mode in MODES:
            prompts[(source, mode)] = _prompt(file, section[mode], f"{source}.{mode}")
    json_text = data.get("json")
    if not isinstance(json_text, str) or "{k}" not in json_text:
        raise PromptFileError(f"prompt file {file}: `json` must be a text holding {{k}}")
    return PromptSet(str(file), prompts, json_text, _batched(file, data.get("batched")))


def _batched(path: Path, data: Any) -> dict[str, BatchedPrompt]:
    """The `batched` section (optional: only tellme.neurons_per_request > 1 needs it)."""
    if data is None:
        return {}
    found = {}
    for source in SOURCES:
        entry = data.get(source) if isinstance(data, dict) else None
        keys = ("system", "neuron", "instruction")
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in keys):
            raise PromptFileError(
                f"prompt file {path}: `batched.{source}` needs `system`, `neuron` and "
                "`instruction` texts"
            )
        if entry["neuron"].count(LISTING) != 1 or "{k}" not in entry["instruction"]:
            raise PromptFileError(
                f"prompt file {path}: `batched.{source}.neuron` must hold {LISTING} once and "
                "its `instruction` {k}"
            )
        found[source] = BatchedPrompt(entry["system"], entry["neuron"], entry["instruction"])
    return found


def file_digest(path: str | Path | None) -> str:
    """sha256 of the prompt file in use: an edited file reruns the explanations."""
    file = Path(path) if path is not None else DEFAULT
    return hashlib.sha256(file.read_bytes()).hexdigest()
