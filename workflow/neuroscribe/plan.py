"""The plan: what a dissection will do, counted before anything expensive runs."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neuroscribe import methods
from neuroscribe.demo.shortcuts import shortcuts_checked
from neuroscribe.fanout import Layout
from neuroscribe.io import write_json
from neuroscribe.paths import RunPaths
from neuroscribe.resources import RULE_STAGES
from neuroscribe.weights import configured_weights_file

# the workflow's own stages in pipeline order, for printing (the plan travels as sorted JSON);
# each method's stages come after the exemplars, in its order
CORE_BEFORE = (
    "render_demo_probe",
    "train_demo_target",
    "check_weights",
    "probe_manifest",
    "activations",
    "merge_activations",
    "exemplars",
)
CORE_AFTER = ("describe", "evaluate_layer", "evaluation_summary", "evaluate_shortcuts", "report")


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
        "report": int(config["report"]["enabled"]),
    }
    evaluation = config["evaluation"]
    if evaluation["enabled"]:
        jobs |= {"evaluate_layer": len(layout.chunks), "evaluation_summary": 1}
        jobs["evaluate_shortcuts"] = int(shortcuts_checked(config))
    n_neurons = sum(len(c.neurons) for c in layout.all_chunks())
    estimates: dict[str, Any] = {"target_forward_images": layout.n_candidates * n_targets}
    for method in methods.enabled(config):
        jobs |= {
            stage.name: len(layout.chunks) if stage.per_layer else n_chunks
            for stage in method.stages
        }
        if method.plan is None:
            continue
        planned = method.plan(layout, config)
        estimates[method.name] = planned["estimates"]
        jobs |= planned.get("jobs", {})  # its per-run and per-target jobs
        for (model, layer), info in planned["layers"].items():
            layers[model][layer][method.name] = info
    return {
        "run": layout.run,
        "results": layout.results,
        "methods": config["methods"],
        "stage_order": stage_order(config),
        "probe": {
            "files": layout.n_candidates,
            # by extension: other files (a README, a CSV) will most likely be rejected
            "image_files": layout.n_image_files,
            "datasets": [d.name for d in layout.datasets],
            "shards": layout.n_shards,
            "shard_size": config["shard_size"],
        },
        "split": split_sizes(layout, methods.holdout(config)),
        "targets": {name: t.spec for name, t in layout.targets.items()},
        "layers": layers,
        "neurons": n_neurons,
        "chunk_size": config["chunk_size"],
        "top_k": config["top_k"],
        "jobs": {k: v for k, v in jobs.items() if v},
        "total_jobs": sum(jobs.values()),
        "estimates": estimates,
    }


def split_sizes(layout: Layout, holdout: float) -> dict[str, Any] | None:
    """The held-out split's sizes (None when nothing is held out): exact once the manifest
    exists, else the expected share of the probe files."""
    if not holdout:
        return None
    import pandas as pd

    from neuroscribe.evaluation.split import heldout_mask

    manifest = Path(layout.paths.manifest)
    if manifest.is_file():
        ids = pd.read_parquet(manifest, columns=["image_id"])["image_id"]
        held, exact = int(heldout_mask(ids, holdout).sum()), True
        total = len(ids)
    else:
        total = layout.n_candidates
        held, exact = round(total * holdout), False
    return {
        "holdout": holdout,
        "images": total,
        "heldout": held,
        "seen_by_methods": total - held,
        "exact": exact,
    }


def stage_order(config: dict[str, Any]) -> list[str]:
    """Every rule of the run in pipeline order."""
    stages = [s.name for m in methods.enabled(config) for s in (*m.jobs, *m.stages)]
    return [*CORE_BEFORE, *stages, *CORE_AFTER]


def run_plan(
    plan: dict[str, Any],
    out: str,
    resources: dict[str, dict[str, Any]],
    cluster: dict[str, Any] | None = None,
    gpus: dict[str, int] | None = None,
    calibration: str | None = None,
    steps: int | None = None,
) -> None:
    """The `plan` stage: add what finished jobs tell (per method, memory peaks, GPU-hours),
    count the cluster jobs of this invocation, write plan.json and print the summary. `gpus`:
    GPUs per job of each rule; `calibration`: gpu_suite.py's file; `steps`: DnD's denoising
    steps (which calibrated preset applies)."""
    for name in plan["methods"]:
        method = methods.get(name)
        if method.observe is not None:
            plan = method.observe(plan, plan["results"])
    plan = observe_memory(plan, resources)
    if gpus is not None:
        from neuroscribe.gpuhours import estimate_gpu_hours

        plan["gpu_hours"] = estimate_gpu_hours(plan, gpus, calibration, steps)
    if cluster is not None:
        plan["cluster"] = cluster_jobs(plan["jobs"], cluster, plan["stage_order"])
    write_json(plan, out)
    print(format_plan(plan))
    for warning in memory_warnings(plan):
        print(warning)
    print(f"plan written to {out}")


def cluster_jobs(jobs: dict[str, int], cluster: dict[str, Any], order: list[str]) -> dict[str, Any]:
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
    for stage in sorted(jobs, key=lambda s: _position(order, s)):
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


def _position(order: list[str], stage: str) -> int:
    return order.index(stage) if stage in order else len(order)


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
        *_format_split(plan.get("split")),
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
    for stage in sorted(plan["jobs"], key=lambda s: _position(plan["stage_order"], s)):
        count = plan["jobs"][stage]
        lines.append(f"    {stage:<20} {count:>7}")
    lines.append(f"    {'total':<20} {plan['total_jobs']:>7}")
    if "cluster" in plan:
        lines += _format_cluster(plan["cluster"])
    estimates = plan["estimates"]
    lines.append(f"  target forward passes: {estimates['target_forward_images']} images")
    for name in plan["methods"]:
        method = methods.get(name)
        if name in estimates and method.format_plan is not None:
            lines += method.format_plan(estimates[name])
    if "gpu_hours" in plan:
        from neuroscribe.gpuhours import format_gpu_hours

        lines += format_gpu_hours(plan["gpu_hours"])
    return "\n".join(lines)


def _format_split(split: dict[str, Any] | None) -> list[str]:
    if split is None:
        return []
    about = "" if split["exact"] else "about "
    return [
        f"  evaluation: {about}{split['heldout']} of {split['images']} probe images held out "
        f"({split['holdout']:.0%}, by image id); the methods see the other "
        f"{about}{split['seen_by_methods']}"
    ]


# warn when a measured peak comes this close to the request: the next, slightly larger chunk
# or layer is killed for memory and retried with more (on SLURM, an out-of-memory retry loop)
MEMORY_MARGIN = 0.10


def _benchmark_peaks(results: str | Path, stages: Iterable[str]) -> dict[str, tuple[float, str]]:
    """The highest `max_rss` (MB) each stage's finished jobs reached, with the job's file."""
    import csv

    peaks: dict[str, tuple[float, str]] = {}
    root = Path(RunPaths(str(results)).benchmarks)
    for path in sorted(root.rglob("*.tsv")):
        rule = path.relative_to(root).parts[0].removesuffix(".tsv")
        stage = RULE_STAGES.get(rule, rule)
        if stage not in stages:
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
    for stage, (peak, job) in _benchmark_peaks(plan["results"], resources).items():
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
    rules = {RULE_STAGES.get(r, r): i for i, r in enumerate(plan.get("stage_order", []))}
    for stage in sorted(memory, key=lambda s: rules.get(s, len(rules))):
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
