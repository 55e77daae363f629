"""Describe-and-Dissect's `reference` mode against the authors' behaviour, rule by rule: prompt
files and their extraction from the authors' code (on a fixture written here, in the shape of
their DnD_models.py with made-up texts), the prompts sent byte for byte, and the post-processing
of replies (colon, comma re-ask, long candidates, the design/graphics rule)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from fake_openai import Reply, fake_openai
from test_concepts import MODEL, client_for

from conftest import REPO
from neuroscribe.config import ConfigError, validate_config
from neuroscribe.methods.dnd import METHOD, settings
from neuroscribe.methods.dnd.concepts import (
    ConceptSettings,
    FrequencyProposer,
    ReferenceProposer,
    background_variants,
    build_proposer,
    reference_join,
)
from neuroscribe.methods.dnd.extract_prompts import extract_reference_prompts, main
from neuroscribe.methods.dnd.prompts import PromptFileError, load_prompts, write_prompts

# made-up texts, in the places the authors' code keeps its own
SIMPLIFY_EXAMPLE = "Say it shorter: " + "a cat on a mat with a cat."
SIMPLIFY_ANSWER = "A cat"
SIMPLIFY_PREFIX = "Shorten, and keep it short: "
SUMMARY_EXAMPLES = [
    ("Name what these share: " + "a dog, " + "a puppy", "dogs"),
    ("Name what these share: " + "a car" + ", " + "a bus.", "vehicles"),
]
SUMMARY_PREFIX = "No full stop. Name what these share and can be drawn: "
REASK_PREFIX = "No full stop. Merge into one: "

FIXTURE = textwrap.dedent(
    """
    import requests

    def GPT_model_single(descriptions, headers=None, model="m", temperature=0.3):
        content_user_1 = (
            "Name what these share: "
            + "a dog, "
            + "a puppy"
        )
        content_assist_1 = (
            "dogs"
        )
        content_user_2 = (
            "Name what these share: " + "a car" + ", " + "a bus."
        )
        content_assist_2 = "vehicles"
        content_user = "No full stop. Name what these share and can be drawn: "
        for i in range(len(descriptions)):
            content_user = content_user + descriptions[i]
        refeed_content = "No full stop. Merge into one: "
        return requests.post("http://unused", json={})

    def GPT_simplify(description, headers=None, model="m", temperature=0.3):
        content_user_1 = (
            "Say it shorter: "
            + "a cat on a mat with a cat."
        )
        content_assist_1 = "A cat"
        content_user = "Shorten, and keep it short: "
        content_user += description
        return requests.post("http://unused", json={})
    """
)


@pytest.fixture
def authors_clone(tmp_path: Path) -> Path:
    clone = tmp_path / "Describe-and-Dissect"
    clone.mkdir()
    (clone / "DnD_models.py").write_text(FIXTURE)
    return clone


@pytest.fixture
def prompt_file(authors_clone: Path, tmp_path: Path) -> Path:
    return write_prompts(extract_reference_prompts(authors_clone), tmp_path / "reference.yaml")


def test_extracts_the_texts_from_a_clone(authors_clone: Path, tmp_path: Path) -> None:
    out = tmp_path / "prompts" / "reference.yaml"
    assert main([str(authors_clone), str(out)]) == 0
    prompts = load_prompts(out)
    assert prompts.name == "reference"
    assert "DnD_models.py" in prompts.source and "sha256" in prompts.source
    (simplify_example,) = prompts.simplify.examples
    assert (simplify_example.user, simplify_example.assistant) == (
        SIMPLIFY_EXAMPLE,
        SIMPLIFY_ANSWER,
    )
    assert prompts.simplify.template == SIMPLIFY_PREFIX + "{caption}"
    assert [(e.user, e.assistant) for e in prompts.summarise.examples] == SUMMARY_EXAMPLES
    assert prompts.summarise.template == SUMMARY_PREFIX + "{descriptions}"
    assert (
        prompts.reask.examples == () and prompts.reask.template == REASK_PREFIX + "{descriptions}"
    )
    # the trailing spaces survive the YAML file
    assert prompts.simplify.messages("x")[-1] == ("user", "Shorten, and keep it short: x")


def test_extraction_names_what_is_missing(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path), str(tmp_path / "out.yaml")]) == 1
    assert "has no DnD_models.py" in capsys.readouterr().err
    (tmp_path / "DnD_models.py").write_text("def GPT_simplify():\n    content_user = 'a: '\n")
    with pytest.raises(PromptFileError, match="no function GPT_model_single"):
        extract_reference_prompts(tmp_path)
    assert not (tmp_path / "out.yaml").exists()


def test_prompt_file_errors_say_what_to_fix(tmp_path: Path) -> None:
    with pytest.raises(
        PromptFileError, match=r"does not exist; extract the authors' texts into it with"
    ):
        load_prompts(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    own = load_prompts(None)
    bad.write_text(
        "simplify: {template: 'no placeholder'}\n"
        f"summarise: {{template: {own.summarise.template!r}}}\n"
        f"reask: {{template: {own.reask.template!r}}}\n"
    )
    with pytest.raises(PromptFileError, match=r"`simplify`.template must hold \{caption\}"):
        load_prompts(bad)
    bad.write_text("simplify: {}\nsummarise: {}\nreask: {}\nextra: 1\n")
    with pytest.raises(PromptFileError, match="unknown key 'extra'"):
        load_prompts(bad)


def test_prompts_sent_equal_the_prompt_file_byte_for_byte(prompt_file: Path) -> None:
    prompts = load_prompts(prompt_file)
    captions = ["a red ball", "a red cup", "a red car"]
    simplified = ["Red ball", "red cup", "Red car"]
    script = [Reply(t) for t in simplified] + [Reply("red things"), Reply("Label: red, round")]
    settings = ConceptSettings(model=MODEL, n=2, max_words=None)
    with fake_openai(*script, default=lambda _b: Reply("red objects")) as server:
        client = client_for(server, None, max_concurrency=1)
        (record,) = ReferenceProposer(client, settings, prompts).propose([(4, captions)])
    sent = [[(m["role"], m["content"]) for m in r["messages"]] for r in server.requests]
    ex = prompts.simplify.examples[0]
    assert sent[:3] == [
        [("user", ex.user), ("assistant", ex.assistant), ("user", SIMPLIFY_PREFIX + c)]
        for c in captions
    ]
    examples = [turn for u, a in SUMMARY_EXAMPLES for turn in (("user", u), ("assistant", a))]
    # the first summary sees the simplified captions as they came back, in rank order
    assert sent[3] == [*examples, ("user", SUMMARY_PREFIX + "Red ball, red cup, Red car")]
    assert sent[4][:-1] == examples and sent[4][-1][1].startswith(SUMMARY_PREFIX)
    # "Label: red, round" -> " red, round" -> re-asked alone
    assert sent[5] == [("user", REASK_PREFIX + " red,  round")]
    assert record.candidates == ["red things", "red objects"]
    assert record.raw_replies == ["red things", "Label: red, round", "red objects"]


def test_colon_keeps_the_text_between_the_first_two() -> None:
    assert ReferenceProposer._label("Concept: striped fabric: close up") == " striped fabric"
    assert ReferenceProposer._label("striped fabric") == "striped fabric"


def test_reference_join_glues_an_item_equal_to_the_last() -> None:
    assert reference_join(["a", "b", "c"]) == "a, b, c"
    # the authors compare by value: a repeat of the last item gets no separator
    assert reference_join(["a", "b", "b"]) == "a, bb"
    assert reference_join(["x", " y"]) == "x,  y"


def test_design_and_graphics_get_a_background_variant() -> None:
    assert background_variants(["Abstract Designs", "geometric graphic", "red stripes"]) == [
        "abstract designs",
        "abstract designs background",
        "geometric graphic",
        "geometric graphic background",
        "red stripes",
    ]
    # checked before the final full stop goes, as in the authors' code
    assert background_variants(["floral designs."]) == ["floral designs."]


def test_background_rule_without_an_llm() -> None:
    captions = ["abstract graphics", "abstract graphics on paper", "bold abstract graphics"]
    (record,) = FrequencyProposer(n=1, background=True).propose([(0, captions)])
    assert record.candidates == ["abstract graphics", "abstract graphics background"]


def test_long_candidates_kept_or_dropped_by_max_words(prompt_file: Path) -> None:
    long = "a row of tall trees along a river bank"
    for max_words, expected in ((None, [long, "trees"]), (5, ["trees"])):
        settings = ConceptSettings(model=MODEL, n=2, max_words=max_words)
        script = [Reply("x")] * 3 + [Reply(long), Reply("trees")]
        with fake_openai(*script) as server:
            client = client_for(server, None, max_concurrency=1)
            proposer = ReferenceProposer(client, settings, load_prompts(prompt_file))
            (record,) = proposer.propose([(1, ["a", "b", "c"])])
        assert record.candidates == expected


def test_background_rule_through_the_proposer(prompt_file: Path) -> None:
    settings = ConceptSettings(model=MODEL, n=1, background_variants=True)
    with fake_openai(*[Reply("x")] * 3, Reply("Colourful Graphics")) as server:
        client = client_for(server, None)
        proposer = ReferenceProposer(client, settings, load_prompts(prompt_file))
        (record,) = proposer.propose([(1, ["a", "b", "c"])])
    assert record.candidates == ["colourful graphics", "colourful graphics background"]


def _config(**dnd) -> dict:
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["dnd"] |= dnd
    return cfg


def test_config_checks_the_prompt_file_early(prompt_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'dnd.prompts'.*used only by the reference prompt mode"):
        validate_config(_config(prompts=str(prompt_file)))
    with pytest.raises(ConfigError, match=r"'dnd.prompts': prompt file .* does not exist"):
        validate_config(_config(prompt_mode="reference", prompts=str(tmp_path / "none.yaml")))
    cfg = validate_config(_config(prompt_mode="reference", prompts=str(prompt_file)))
    assert cfg["dnd"]["max_words"] == 5 and cfg["dnd"]["background_variants"] is False
    # an edited prompt file reruns the concepts stage
    before = settings("concepts", cfg)
    prompt_file.write_text(prompt_file.read_text().replace("Merge into one", "Merge them"))
    assert settings("concepts", cfg) != before
    assert METHOD.moved_keys["llm.prompt_mode"] == "dnd.prompt_mode"
    assert "llm.prompts" not in METHOD.moved_keys


def test_build_proposer_reads_the_prompt_file(prompt_file: Path) -> None:
    cfg = {
        "backend": "openai",
        "model": MODEL,
        "base_url": "http://127.0.0.1:9/v1",
        "api_key_env": None,
        "prompt_mode": "reference",
        "prompts": str(prompt_file),
        "candidates": 2,
        "temperature": 0.3,
        "max_tokens": 64,
        "seed": 0,
        "neurons_per_request": 1,
        "max_words": None,
        "background_variants": True,
        "max_concurrency": 1,
        "max_attempts": 1,
        "timeout_s": 1,
    }
    proposer = build_proposer(cfg, None, "cpu", "auto")
    assert isinstance(proposer, ReferenceProposer)
    assert proposer.id.endswith(":prompts=reference")
    assert proposer.settings.max_words is None and proposer.settings.background_variants


def test_reference_preset_layers_over_the_paper_config(
    prompt_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from snakemake.utils import update_config  # how `--configfile a.yaml b.yaml` layers files

    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    update_config(cfg, yaml.safe_load((REPO / "config" / "reference.yaml").read_text()))
    cfg["probe"]["datasets"][0]["path"] = str(prompt_file.parent)
    # the authors' texts are the user's to extract: without them the preset stops early
    monkeypatch.chdir(tmp_path)  # where the preset's relative prompt file is not
    with pytest.raises(ConfigError, match=r"extract_prompts CLONE dnd-reference-prompts\.yaml"):
        validate_config(yaml.safe_load(yaml.safe_dump(cfg)))
    cfg["dnd"]["prompts"] = str(prompt_file)
    cfg = validate_config(cfg)
    dnd = cfg["dnd"]
    assert (dnd["prompt_mode"], dnd["max_words"], dnd["background_variants"]) == (
        "reference",
        None,
        True,
    )
    assert dnd["synthesizer"]["model"] == "CompVis/stable-diffusion-v1-4"
    assert dnd["synthesizer"]["scheduler"] == "DPMSolverMultistepScheduler"
    assert dnd["synthesizer"]["dtype"] == "float16" and cfg["dtype"] == "float32"
    assert dnd["scoring"]["resize"] == 32
    assert (cfg["crop_regions"], cfg["crop_squash"]) == ("outer-8", 375)
    assert cfg["captioner"]["model"] == "Salesforce/blip-image-captioning-base"
    assert (cfg["captioner"]["max_new_tokens"], cfg["captioner"]["min_length"]) == (32, 5)
    assert (cfg["llm"]["model"], dnd["temperature"]) == ("gpt-4-0125-preview", 0.3)
