"""What each stage's jobs ask the scheduler for: GPUs derived from the device and the backends.

A job that cannot use a GPU must not ask for one: on `profiles/local` every GPU job takes the
single `gpu` slot, so a CPU run whose jobs all claim it runs them one at a time; on SLURM a job
asking for a GPU it does not use waits for a GPU node and wastes it.
"""

from __future__ import annotations

from typing import Any

# limits every invocation gets unless the command line or profile sets its own: a
# `--resources llm_api=2` on the command line replaces the profile's whole `resources:` map, and
# without `gpu` GPU jobs would share one device (locally) or a group would ask for several GPUs
DEFAULT_LIMITS = {"gpu": 1, "llm_api": 4}


# stages of the workflow itself that run a model (the demo target trains on the CPU; manifest,
# merge and describe run none)
GPU_STAGES = ("activations", "exemplars")


def stage_uses_gpu(config: dict[str, Any], stage: str) -> bool:
    """Whether the stage's backend computes anything on a GPU at all (device aside)."""
    from neuroscribe import methods

    if stage == "evaluation":
        return _evaluation_uses_gpu(config)
    method_stages = methods.all_jobs(config)
    if stage in method_stages:
        return method_stages[stage].uses_gpu(config)
    return stage in GPU_STAGES


def _evaluation_uses_gpu(config: dict[str, Any]) -> bool:
    """The clip simulator embeds images; annotations run no model; llm runs the chat model in
    the job (`llm.backend: local`) and captions the held-out images (a blip captioner)."""
    backend = config["evaluation"]["simulator"]["backend"]
    if backend == "llm":
        return config["llm"]["backend"] == "local" or config["captioner"]["backend"] == "blip"
    return backend == "clip"


def stage_gpus(config: dict[str, Any], stage: str) -> int:
    """GPUs per job of `stage`: none on `device: cpu` or for a backend that runs no model;
    else `resources.<stage>.gpus`, which defaults (null) to 1 for stages that use one."""
    if config["device"] == "cpu" or not stage_uses_gpu(config, stage):
        return 0
    asked = config["resources"][stage]["gpus"]
    return 1 if asked is None else asked


# rules whose `resources.<stage>` entry has another name; every other rule's is its own name
RULE_STAGES = {
    "probe_manifest": "manifest",
    "train_demo_target": "train",
    "merge_activations": "merge",
    "evaluate_layer": "evaluation",
}


def rule_gpus(config: dict[str, Any]) -> dict[str, int]:
    """GPUs each rule's jobs ask for, by rule name (the stages' and the renamed rules')."""
    found = {stage: stage_gpus(config, stage) for stage in config["resources"]}
    return found | {rule: found.get(stage, 0) for rule, stage in RULE_STAGES.items()}
