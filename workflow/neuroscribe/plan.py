"""The plan: what a dissection will do, counted before anything expensive runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroscribe.fanout import Layout
from neuroscribe.weights import configured_weights_file

# pipeline order, for printing (the plan travels as sorted JSON)
STAGES = (
    "render_demo_probe",
    "train_demo_target",
    "check_weights",
    "probe_manifest",
    "activations",
    "merge_activations",
    "exemplars",
    "captions",
    "concepts",
    "synthesis",
    "scores",
    "describe",
)

# rough token sizes for the LLM estimates (BLIP captions are ~10 words)
CAPTION_TOKENS = 15
LABEL_TOKENS = 8


def llm_estimate(neurons: int, top_k: int, llm: dict[str, Any]) -> dict[str, int]:
    """Requests and tokens the concept stage will make for `neurons` (upper bounds, no cache)."""
    n = llm["candidates"]
    if llm["backend"] == "none":
        return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
    if llm["prompt_mode"] == "reference":
        # K caption simplifications and N summaries per neuron (a re-summary now and then)
        requests = neurons * (top_k + n)
        prompt = neurons * (top_k * (90 + 2 * CAPTION_TOKENS) + n * (260 + top_k * LABEL_TOKENS))
        completion = requests * LABEL_TOKENS
    else:
        per = llm["neurons_per_request"]
        requests = -(-neurons // per)
        prompt = requests * 150 + neurons * (10 + top_k * (CAPTION_TOKENS + 3))
        completion = requests * 15 + neurons * (10 + n * LABEL_TOKENS)
    return {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion}


def build_plan(layout: Layout, config: dict[str, Any]) -> dict[str, Any]:
    layers = {}
    for model, sizes in layout.layer_sizes.items():
        layers[model] = {
            layer: {
                "neurons_in_layer": size,
                "neurons_described": sum(len(c.neurons) for c in layout.chunks[(model, layer)]),
                "chunks": len(layout.chunks[(model, layer)]),
            }
            for layer, size in sizes.items()
        }
    n_targets = len(layout.targets)
    n_chunks = len(layout.all_chunks())
    jobs = {
        "render_demo_probe": sum(d.type == "demo" for d in layout.datasets),
        "train_demo_target": sum(t.train is not None for t in layout.targets.values()),
        "check_weights": sum(
            configured_weights_file(t) is not None for t in layout.targets.values()
        ),
        "probe_manifest": 1,
        "activations": layout.n_shards * n_targets,
        "merge_activations": sum(len(t.layers) for t in layout.targets.values()),
        "exemplars": n_chunks,
        "describe": 1,
    }
    n_neurons = sum(len(c.neurons) for c in layout.all_chunks())
    top_k = config["top_k"]
    estimates: dict[str, Any] = {"target_forward_images": layout.n_candidates * n_targets}
    if "dnd" in config["methods"]:
        jobs |= {
            "captions": n_chunks,
            "concepts": n_chunks,
            "synthesis": n_chunks,
            "scores": n_chunks,
        }
        for model_layers in layers.values():
            for info in model_layers.values():
                described = info["neurons_described"]
                info["exemplars_to_caption"] = described * top_k
                info["llm"] = llm_estimate(described, top_k, config["llm"])
        estimates["exemplars_to_caption"] = n_neurons * top_k
        estimates["llm"] = llm_estimate(n_neurons, top_k, config["llm"]) | {
            "backend": config["llm"]["backend"],
            "model": config["llm"]["model"],
            "prompt_mode": config["llm"]["prompt_mode"],
        }
        synth = config["synthesizer"]
        # upper bounds: every candidate distinct; the concepts files give the real count
        prompts = n_neurons * config["llm"]["candidates"]
        images = prompts * synth["images_per_concept"]
        estimates["synthesis"] = {
            "backend": synth["backend"],
            "prompts_at_most": prompts,
            "images_at_most": images,
            "denoising_steps_at_most": images * synth["steps"]
            if synth["backend"] == "diffusers"
            else 0,
        }
        estimates["scoring"] = {
            "target_forward_images_at_most": images,
            "similarity_forward_images_at_most": images + n_neurons * top_k,
        }
    return {
        "run": layout.run,
        "results": layout.results,
        "methods": config["methods"],
        "probe": {
            "files": layout.n_candidates,
            # by extension: other files (a README, a CSV) will most likely be rejected
            "image_files": layout.n_image_files,
            "datasets": [d.name for d in layout.datasets],
            "shards": layout.n_shards,
            "shard_size": config["shard_size"],
        },
        "targets": {name: t.spec for name, t in layout.targets.items()},
        "layers": layers,
        "neurons": n_neurons,
        "chunk_size": config["chunk_size"],
        "top_k": config["top_k"],
        "jobs": {k: v for k, v in jobs.items() if v},
        "total_jobs": sum(jobs.values()),
        "estimates": estimates,
    }


def cluster_jobs(jobs: dict[str, int], cluster: dict[str, Any]) -> dict[str, Any]:
    """The jobs a run submits to the cluster, per stage or group of stages, with the executor
    and profile of this invocation: local rules submit none, and a group submits one job per
    `group-components` of its connected parts (one per chunk for the chunk groups)."""
    view: dict[str, Any] = {
        "executor": cluster["executor"],
        "remote": cluster["remote"],
        "limits": cluster.get("limits", {}),
    }
    if not cluster["remote"]:
        return view
    submitted: dict[str, int] = {}
    grouped: dict[str, list[str]] = {}
    on_head = []
    for stage in sorted(jobs, key=_stage_order):
        group = cluster["groups"].get(stage)
        if stage in cluster["local"]:
            on_head.append(stage)
        elif group:
            grouped.setdefault(group, []).append(stage)
        else:
            submitted[stage] = jobs[stage]
    for group, stages in grouped.items():
        parts = max(jobs[s] for s in stages)
        per_job = cluster["group_components"].get(group, 1)
        submitted[f"{group}: {'+'.join(stages)}"] = -(-parts // per_job)
    return view | {
        "submitted": submitted,
        "total": sum(submitted.values()),
        "on_head": on_head,
        "group_components": {g: cluster["group_components"].get(g, 1) for g in grouped},
    }


def _stage_order(stage: str) -> int:
    return STAGES.index(stage) if stage in STAGES else len(STAGES)


def _format_cluster(cluster: dict[str, Any]) -> list[str]:
    if not cluster["remote"]:
        return [
            f"  executor {cluster['executor']}: every job runs on this machine; "
            "`snakemake plan --profile profiles/slurm` counts the SLURM jobs"
        ]
    per_job = ", ".join(f"{g}: {n} chunk(s)" for g, n in cluster["group_components"].items())
    lines = [f"  {cluster['executor']} jobs submitted with this profile (per job: {per_job}):"]
    width = max(len(name) for name in cluster["submitted"])
    for name, count in cluster["submitted"].items():
        lines.append(f"    {name:<{width}} {count:>7}")
    lines.append(f"    {'total':<{width}} {cluster['total']:>7}")
    if cluster["on_head"]:
        lines.append(f"    on the head node, not submitted: {', '.join(cluster['on_head'])}")
    return lines


def format_plan(plan: dict[str, Any]) -> str:
    """A readable summary of `build_plan`'s result."""
    probe = plan["probe"]
    lines = [
        f"neuroscribe plan for run '{plan['run']}' (results in {plan['results']}/)",
        f"  probe: {probe['files']} files ({probe['image_files']} with image extensions) "
        f"in {len(probe['datasets'])} dataset(s) "
        f"({', '.join(probe['datasets'])}), {probe['shards']} shard(s) of ≤{probe['shard_size']}",
        f"  methods: {', '.join(plan['methods'])}; top-{plan['top_k']} images per neuron",
        "  neurons per layer:",
    ]
    for model, layers in plan["layers"].items():
        lines.append(f"    {model} ({plan['targets'][model]})")
        width = max(len(name) for name in layers)
        for name, info in layers.items():
            lines.append(
                f"      {name:<{width}}  {info['neurons_described']:>7} of {info['neurons_in_layer']:>7}"
                f"  in {info['chunks']} chunk(s) of ≤{plan['chunk_size']}"
            )
    lines.append(f"  total: {plan['neurons']} neurons")
    lines.append("  jobs per stage:")
    for stage in sorted(plan["jobs"], key=_stage_order):
        count = plan["jobs"][stage]
        lines.append(f"    {stage:<20} {count:>7}")
    lines.append(f"    {'total':<20} {plan['total_jobs']:>7}")
    if "cluster" in plan:
        lines += _format_cluster(plan["cluster"])
    estimates = plan["estimates"]
    lines.append(f"  target forward passes: {estimates['target_forward_images']} images")
    if "exemplars_to_caption" in estimates:
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
    if "synthesis" in estimates:
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
    return "\n".join(lines)


def observe_concepts(plan: dict[str, Any], images_per_concept: int) -> dict[str, Any]:
    """Add what finished concept chunks say about de-duplication (run once, by `plan`)."""
    import pyarrow.parquet as pq

    if "synthesis" not in plan["estimates"]:
        return plan
    files = sorted(Path(plan["results"], "concepts").glob("*/*/*.parquet"))
    if not files:
        return plan
    distinct: set[str] = set()
    candidates = neurons = 0
    for f in files:
        column = pq.read_table(f, columns=["candidates"]).column("candidates").to_pylist()
        neurons += len(column)
        candidates += sum(len(c) for c in column)
        distinct.update(c for cands in column for c in cands)
    images = len(distinct) * images_per_concept
    plan["estimates"]["synthesis"]["observed"] = {
        "chunks": len(files),
        "neurons": neurons,
        "candidates": candidates,
        "distinct_prompts": len(distinct),
        "images": images,
        "images_per_neuron": images / max(neurons, 1),
    }
    return plan


# the stage (config `resources.<stage>`) of each rule that writes a benchmark file
RULE_STAGES = {
    "probe_manifest": "manifest",
    "train_demo_target": "train",
    "activations": "activations",
    "merge_activations": "merge",
    "exemplars": "exemplars",
    "captions": "captions",
    "concepts": "concepts",
    "synthesis": "synthesis",
    "scores": "scores",
    "describe": "describe",
}
# warn when a measured peak comes this close to the request: the next, slightly larger chunk
# or layer is killed for memory and retried with more (on SLURM, an out-of-memory retry loop)
MEMORY_MARGIN = 0.10


def _benchmark_peaks(results: str | Path) -> dict[str, tuple[float, str]]:
    """The highest `max_rss` (MB) each stage's finished jobs reached, with the job's file."""
    import csv

    peaks: dict[str, tuple[float, str]] = {}
    root = Path(results, "benchmarks")
    for path in sorted(root.rglob("*.tsv")):
        rule = path.relative_to(root).parts[0].removesuffix(".tsv")
        stage = RULE_STAGES.get(rule)
        if stage is None:
            continue
        with open(path, newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                try:
                    rss = float(row.get("max_rss", ""))
                except ValueError:
                    continue  # "NA": the job ended before its memory was sampled
                if rss > peaks.get(stage, (-1.0, ""))[0]:
                    peaks[stage] = (rss, str(path.relative_to(root)))
    return peaks


def observe_memory(plan: dict[str, Any], resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Compare each stage's measured peak memory (benchmark files of finished jobs) with its
    request, and list the stages that came within MEMORY_MARGIN of it (run once, by `plan`)."""
    measured = {}
    for stage, (peak, job) in _benchmark_peaks(plan["results"]).items():
        asked = resources[stage]["mem_mb"]
        measured[stage] = {
            "peak_mb": round(peak, 1),
            "requested_mb": asked,
            "job": job,
            "tight": peak >= (1 - MEMORY_MARGIN) * asked,
        }
    if measured:
        plan["memory"] = measured
    return plan


def memory_warnings(plan: dict[str, Any]) -> list[str]:
    lines = []
    memory = plan.get("memory", {})
    for stage in sorted(memory, key=lambda s: list(RULE_STAGES.values()).index(s)):
        m = memory[stage]
        if not m["tight"]:
            continue
        where = "above" if m["peak_mb"] > m["requested_mb"] else f"within {MEMORY_MARGIN:.0%} of"
        lines.append(
            f"  warning: {stage} jobs peaked at {m['peak_mb']:.0f} MB ({m['job']}), {where} "
            f"their request of {m['requested_mb']} MB: raise resources.{stage}.mem_mb in the "
            f"config, or larger {stage} jobs will run out of memory (on SLURM: killed and "
            "retried with more)"
        )
    return lines
