"""The plan: what a dissection will do, counted before anything expensive runs."""

from __future__ import annotations

from typing import Any

from neuroscribe.fanout import Layout

# pipeline order, for printing (the plan travels as sorted JSON)
STAGES = (
    "render_demo_probe",
    "train_demo_target",
    "probe_manifest",
    "activations",
    "merge_activations",
    "exemplars",
    "describe",
)


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
        "probe_manifest": 1,
        "activations": layout.n_shards * n_targets,
        "merge_activations": sum(len(t.layers) for t in layout.targets.values()),
        "exemplars": n_chunks,
        "describe": 1,
    }
    return {
        "run": layout.run,
        "results": layout.results,
        "methods": config["methods"],
        "probe": {
            "files": layout.n_candidates,
            "datasets": [d.name for d in layout.datasets],
            "shards": layout.n_shards,
            "shard_size": config["shard_size"],
        },
        "targets": {name: t.spec for name, t in layout.targets.items()},
        "layers": layers,
        "neurons": sum(len(c.neurons) for c in layout.all_chunks()),
        "chunk_size": config["chunk_size"],
        "top_k": config["top_k"],
        "jobs": {k: v for k, v in jobs.items() if v},
        "total_jobs": sum(jobs.values()),
        "estimates": {"target_forward_images": layout.n_candidates * n_targets},
    }


def format_plan(plan: dict[str, Any]) -> str:
    """A readable summary of `build_plan`'s result."""
    probe = plan["probe"]
    lines = [
        f"neuroscribe plan for run '{plan['run']}' (results in {plan['results']}/)",
        f"  probe: {probe['files']} files in {len(probe['datasets'])} dataset(s) "
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
    for stage in sorted(
        plan["jobs"], key=lambda s: STAGES.index(s) if s in STAGES else len(STAGES)
    ):
        count = plan["jobs"][stage]
        lines.append(f"    {stage:<20} {count:>7}")
    lines.append(f"    {'total':<20} {plan['total_jobs']:>7}")
    lines.append(f"  target forward passes: {plan['estimates']['target_forward_images']} images")
    return "\n".join(lines)
