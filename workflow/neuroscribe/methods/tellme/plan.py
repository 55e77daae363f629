"""TeLLMe's plan estimates: images to caption, requests and tokens, before anything runs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from neuroscribe.config import derive

if TYPE_CHECKING:
    from neuroscribe.fanout import Layout

# rough token sizes (BLIP captions are ~10 words; a class name ~3 tokens)
CAPTION_TOKENS = 15
CLASS_TOKENS = 4
SYSTEM_TOKENS = 120
# a few-shot neuron of the reference mode: its listing and its explanation
FEW_SHOT_TOKENS = 2 * (7 * (CAPTION_TOKENS + 2) + 20)
EXPLANATION_TOKENS = 20
# a simulator reply line: "12<TAB>7\n"
LINE_TOKENS = 4


def requests(config: dict[str, Any], chunk_sizes: list[int]) -> int:
    """One variant's requests for chunks of these sizes: an explainer request per neuron (or per
    group of `neurons_per_request` in a chunk), then one simulation per candidate (none of
    either without an LLM)."""
    tellme = config["tellme"]
    per = tellme["neurons_per_request"]
    explain = (
        sum(-(-size // per) for size in chunk_sizes) if config["llm"]["backend"] != "none" else 0
    )
    simulate = tellme["candidates"] if tellme["simulator"]["backend"] == "llm" else 0
    return explain + simulate * sum(chunk_sizes)


def tokens_per_neuron(config: dict[str, Any], variant: str) -> dict[str, int]:
    """Prompt and completion tokens of one neuron's requests of one variant."""
    tellme, k = config["tellme"], config["tellme"]["candidates"]
    if variant == "activations":
        shown, scored, item = (
            tellme["explain_top"] + tellme["explain_random"],
            tellme["score_items"],
            CAPTION_TOKENS,
        )
    else:
        weights = tellme["weights"]
        shown, scored, item = weights["explain_classes"], weights["score_classes"], CLASS_TOKENS
    prompt = completion = 0
    if config["llm"]["backend"] != "none":
        batched = tellme["neurons_per_request"] > 1  # no few-shot neurons, one system text
        few_shot = FEW_SHOT_TOKENS if tellme["prompt_mode"] == "reference" and not batched else 0
        prompt += SYSTEM_TOKENS + few_shot + shown * (item + 2)
        completion += k * EXPLANATION_TOKENS
    if tellme["simulator"]["backend"] == "llm":
        prompt += k * (SYSTEM_TOKENS + EXPLANATION_TOKENS + scored * (item + 3))
        completion += k * scored * LINE_TOKENS
    return {"prompt_tokens": prompt, "completion_tokens": completion}


def estimate(layout: Layout, config: dict[str, Any]) -> dict[str, Any]:
    """Per layer and in all: images to caption (at most: every listed image distinct) and the
    LLM's requests and tokens (before cache hits)."""
    from neuroscribe.methods.tellme import weight_layers

    tellme = config["tellme"]
    with_weights = weight_layers(layout, config)
    per_image = tellme["explain_top"] + round(tellme["score_items"] * tellme["score_top_fraction"])
    shared = tellme["explain_random"] + tellme["score_items"]
    layers, totals = {}, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    images = 0
    for (model, layer), chunks in layout.chunks.items():
        sizes = [len(c.neurons) for c in chunks]
        neurons = sum(sizes)
        variants = ["activations"] + (["weights"] if (model, layer) in with_weights else [])
        llm = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        for variant in variants:
            llm["requests"] += requests(config, sizes)
            for key, value in tokens_per_neuron(config, variant).items():
                llm[key] += neurons * value
        captioned = min(neurons * per_image + shared, layout.n_image_files)
        images += captioned
        layers[(model, layer)] = {"images_to_caption": captioned, "llm": llm, "variants": variants}
        for key in totals:
            totals[key] += llm[key]
    estimates = {
        "images_to_caption": min(images, layout.n_image_files),
        "llm": totals
        | {
            "backend": config["llm"]["backend"],
            "model": derive(config).llm_model,
            "prompt_mode": tellme["prompt_mode"],
            "simulator": tellme["simulator"]["backend"],
            "neurons_per_request": tellme["neurons_per_request"],
            "candidates": tellme["candidates"],
        },
    }
    return {"estimates": estimates, "layers": layers}


def format_estimates(estimates: dict[str, Any]) -> list[str]:
    """The plan summary's lines for TeLLMe."""
    llm = estimates["llm"]
    lines = [
        f"  images to caption: ≤{estimates['images_to_caption']} (whole images, each captioned "
        "once per run)"
    ]
    if llm["requests"] == 0:
        lines.append(
            f"  LLM: none (explanations from caption phrases; simulator {llm['simulator']})"
        )
    else:
        lines.append(
            f"  LLM ({llm['backend']}, {llm['model']}, {llm['prompt_mode']}, simulator "
            f"{llm['simulator']}): ≤{llm['requests']} requests (an explanation per "
            + (
                "neuron"
                if llm["neurons_per_request"] == 1
                else f"{llm['neurons_per_request']} neurons"
            )
            + f" and variant, then {llm['candidates']} simulations per neuron), "
            f"~{llm['prompt_tokens']} prompt + "
            f"~{llm['completion_tokens']} completion tokens (before cache hits)"
        )
    return lines
