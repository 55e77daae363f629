"""Describe-and-Dissect's plan estimates: requests, tokens and images, before anything runs."""

from __future__ import annotations

import glob
from typing import TYPE_CHECKING, Any

from neuroscribe.config import derive
from neuroscribe.paths import RunPaths

if TYPE_CHECKING:
    from neuroscribe.fanout import Layout

# rough token sizes for the LLM estimates (BLIP captions are ~10 words)
CAPTION_TOKENS = 15
LABEL_TOKENS = 8


def llm_estimate(neurons: int, top_k: int, backend: str, dnd: dict[str, Any]) -> dict[str, int]:
    """Requests and tokens the concept stage will make for `neurons` (upper bounds, no cache)."""
    n = dnd["candidates"]
    if backend == "none":
        return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    if dnd["prompt_mode"] == "reference":
        # K caption simplifications and N summaries per neuron (a re-summary now and then)
        requests = neurons * (top_k + n)
        prompt = neurons * (top_k * (90 + 2 * CAPTION_TOKENS) + n * (260 + top_k * LABEL_TOKENS))
        completion = requests * LABEL_TOKENS
    else:
        per = dnd["neurons_per_request"]
        requests = -(-neurons // per)
        prompt = requests * 150 + neurons * (10 + top_k * (CAPTION_TOKENS + 3))
        completion = requests * 15 + neurons * (10 + n * LABEL_TOKENS)
    return {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion}


def estimate(layout: Layout, config: dict[str, Any]) -> dict[str, Any]:
    """Per layer: exemplars to caption and LLM use; in all: the same, plus images to draw and
    score (upper bounds: every candidate distinct; `observe` adds the real count)."""
    dnd, backend, top_k = config["dnd"], config["llm"]["backend"], config["top_k"]
    layers = {}
    n_neurons = 0
    for (model, layer), chunks in layout.chunks.items():
        described = sum(len(c.neurons) for c in chunks)
        n_neurons += described
        layers[(model, layer)] = {
            "exemplars_to_caption": described * top_k,
            "llm": llm_estimate(described, top_k, backend, dnd),
        }
    synth = dnd["synthesizer"]
    # a background variant can double a neuron's candidates
    prompts = n_neurons * dnd["candidates"] * (2 if dnd["background_variants"] else 1)
    images = prompts * synth["images_per_concept"]
    estimates = {
        "exemplars_to_caption": n_neurons * top_k,
        "llm": llm_estimate(n_neurons, top_k, backend, dnd)
        | {
            "backend": backend,
            "model": derive(config).llm_model,
            "prompt_mode": dnd["prompt_mode"],
        },
        "synthesis": {
            "backend": synth["backend"],
            "images_per_concept": synth["images_per_concept"],
            "prompts_at_most": prompts,
            "images_at_most": images,
            "denoising_steps_at_most": images * synth["steps"]
            if synth["backend"] == "diffusers"
            else 0,
        },
        "scoring": {
            "target_forward_images_at_most": images,
            "similarity_forward_images_at_most": images + n_neurons * top_k,
        },
    }
    return {"estimates": estimates, "layers": layers}


def observe(plan: dict[str, Any], results: str) -> dict[str, Any]:
    """Add what finished concept chunks say about de-duplication (run once, by `plan`)."""
    import pyarrow.parquet as pq

    synthesis = plan["estimates"].get("dnd", {}).get("synthesis")
    if synthesis is None:
        return plan
    files = sorted(glob.glob(RunPaths(results).chunk_files("concepts")))
    if not files:
        return plan
    distinct: set[str] = set()
    candidates = neurons = 0
    for f in files:
        column = pq.read_table(f, columns=["candidates"]).column("candidates").to_pylist()
        neurons += len(column)
        candidates += sum(len(c) for c in column)
        distinct.update(c for cands in column for c in cands)
    images = len(distinct) * synthesis["images_per_concept"]
    synthesis["observed"] = {
        "chunks": len(files),
        "neurons": neurons,
        "candidates": candidates,
        "distinct_prompts": len(distinct),
        "images": images,
        "images_per_neuron": images / max(neurons, 1),
    }
    return plan


def format_estimates(estimates: dict[str, Any]) -> list[str]:
    """The plan summary's lines for Describe-and-Dissect."""
    lines: list[str] = []
    llm = estimates["llm"]
    lines.append(
        f"  exemplars to caption: ≤{estimates['exemplars_to_caption']} images and crops "
        "(each distinct one captioned once)"
    )
    if llm["backend"] == "none":
        lines.append("  LLM: none (candidates are the captions' own phrases; no requests)")
    else:
        lines.append(
            f"  LLM ({llm['backend']}, {llm['model']}, {llm['prompt_mode']}): "
            f"≤{llm['requests']} requests, ~{llm['prompt_tokens']} prompt + "
            f"~{llm['completion_tokens']} completion tokens (before cache hits)"
        )
    synth, scoring = estimates["synthesis"], estimates["scoring"]
    seen = synth.get("observed")
    lines.append(
        f"  synthesis ({synth['backend']}): ≤{synth['prompts_at_most']} prompts, "
        f"≤{synth['images_at_most']} images"
        + (
            f", ≤{synth['denoising_steps_at_most']} denoising steps"
            if synth["denoising_steps_at_most"]
            else ""
        )
        + " before de-duplication"
    )
    if seen:
        lines.append(
            f"    from {seen['chunks']} finished concept chunk(s): {seen['distinct_prompts']} "
            f"distinct prompts of {seen['candidates']} candidates, "
            f"{seen['images']} images ({seen['images_per_neuron']:.1f} per neuron)"
        )
    lines.append(
        f"  scoring: ≤{scoring['target_forward_images_at_most']} target and "
        f"≤{scoring['similarity_forward_images_at_most']} similarity forward images"
    )

    return lines
