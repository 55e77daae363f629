"""Extract Describe-and-Dissect's prompt texts from a local clone of the authors' code.

Their repository (Trustworthy-ML-Lab/Describe-and-Dissect) has no license, so neuroscribe ships
none of its texts. This reads them, with `ast` (the file is parsed, never run), from the clone a
user has, into a prompt file for `dnd.prompts`:

    python -m neuroscribe.methods.dnd.extract_prompts path/to/Describe-and-Dissect prompts.yaml
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from neuroscribe.methods.dnd.prompts import PLACEHOLDERS, PromptFileError, write_prompts

# where each text is in the authors' DnD_models.py: function -> {variable: (request, role)}
SOURCE_FILE = "DnD_models.py"
_LOCATIONS = {
    "GPT_simplify": {
        "content_user_1": ("simplify", 0, "user"),
        "content_assist_1": ("simplify", 0, "assistant"),
        "content_user": ("simplify", None, "template"),
    },
    "GPT_model_single": {
        "content_user_1": ("summarise", 0, "user"),
        "content_assist_1": ("summarise", 0, "assistant"),
        "content_user_2": ("summarise", 1, "user"),
        "content_assist_2": ("summarise", 1, "assistant"),
        "content_user": ("summarise", None, "template"),
        "refeed_content": ("reask", None, "template"),
    },
}


def _string(node: ast.expr) -> str | None:
    """The value of a string literal or a `+` of string literals; None for anything else (the
    file is parsed, never run)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _string(node.left), _string(node.right)
        if left is not None and right is not None:
            return left + right
    return None


def _first_assignments(function: ast.FunctionDef) -> dict[str, str]:
    """Each variable's first plain assignment of a string in the function (later `+=` lines
    append the captions at run time)."""
    found: dict[str, str] = {}
    for node in ast.walk(function):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            value = _string(node.value)
            if isinstance(target, ast.Name) and value is not None:
                found.setdefault(target.id, value)
    return found


def _commit(clone: Path) -> str:
    if not (clone / ".git").exists():  # not a clone: git would name an enclosing repository
        return "unknown commit"
    try:
        done = subprocess.run(
            ["git", "-C", str(clone), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return done.stdout.strip()


def extract_reference_prompts(clone: str | Path) -> dict[str, Any]:
    """The authors' prompt texts, read with `ast` from DnD_models.py of a local clone of
    Trustworthy-ML-Lab/Describe-and-Dissect, as a prompt-file mapping."""
    clone = Path(clone)
    source = clone / SOURCE_FILE
    if not source.is_file():
        raise PromptFileError(
            f"{clone} has no {SOURCE_FILE}: give the folder of a clone of "
            "https://github.com/Trustworthy-ML-Lab/Describe-and-Dissect"
        )
    code = source.read_bytes()
    functions = {
        node.name: node
        for node in ast.walk(ast.parse(code, filename=str(source)))
        if isinstance(node, ast.FunctionDef)
    }
    out: dict[str, Any] = {
        "source": (
            f"Trustworthy-ML-Lab/Describe-and-Dissect {SOURCE_FILE} at {_commit(clone)} "
            f"(sha256 {hashlib.sha256(code).hexdigest()[:16]})"
        ),
        **{key: {"examples": [], "template": ""} for key in PLACEHOLDERS},
    }
    missing = [name for name in _LOCATIONS if name not in functions]
    if missing:
        raise PromptFileError(
            f"{source} has no function {', '.join(missing)}: is this the authors' code?"
        )
    for name, variables in _LOCATIONS.items():
        texts = _first_assignments(functions[name])
        for variable, (key, index, role) in variables.items():
            if variable not in texts:
                raise PromptFileError(
                    f"{source}: {name} assigns no string to {variable}; the code has changed "
                    "since this extractor was written"
                )
            if role == "template":
                # the authors append the text to the prompt: the placeholder goes at the end
                out[key]["template"] = texts[variable] + PLACEHOLDERS[key]
            else:
                examples = out[key]["examples"]
                while len(examples) <= index:
                    examples.append({})
                examples[index][role] = texts[variable]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m neuroscribe.methods.dnd.extract_prompts",
        description="Extract Describe-and-Dissect's prompt texts from a local clone of the "
        "authors' code into a prompt file for `dnd.prompts` (prompt_mode: reference).",
    )
    parser.add_argument(
        "clone", help="folder of a clone of Trustworthy-ML-Lab/Describe-and-Dissect"
    )
    parser.add_argument("out", help="prompt file to write (YAML)")
    args = parser.parse_args(argv)
    try:
        path = write_prompts(extract_reference_prompts(args.clone), args.out)
    except PromptFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {path}; use it with `dnd: {{prompt_mode: reference, prompts: {path}}}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
