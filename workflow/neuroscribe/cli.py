"""`python -m neuroscribe STAGE JSON`: the one call each Snakemake rule makes into the package.

The JSON object holds the stage's arguments (paths, specs, settings), so a job can be re-run by
hand from the command `snakemake -p` prints.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from typing import Any

from neuroscribe.config import DatasetSpec, LayerSpec, TargetSpec
from neuroscribe.io import write_json
from neuroscribe.redaction import RedactingFilter, redact, secret_values

# Stage modules are imported inside each stage: a light job (manifest, merge, table) then never
# pays for importing torch, which is most of a small job's start-up time.


def _render_demo(a: dict[str, Any]) -> None:
    from neuroscribe.demo import world

    world.render_world(a["out_dir"], a["n_images"], a["image_size"], a["seed"])


def _train(a: dict[str, Any]) -> None:
    from neuroscribe.demo import cnn as demo

    demo.train_target(
        TargetSpec.from_dict(a["target"]), a["out"], a["metrics"], **a["target"]["train"]
    )


def _manifest(a: dict[str, Any]) -> None:
    from neuroscribe import probe

    datasets = [DatasetSpec.from_dict(d) for d in a["datasets"]]
    probe.build_manifest(
        datasets, a["results"], a["manifest"], a["rejected"], a.get("workers", 1), a["resize"]
    )


def _activations(a: dict[str, Any]) -> None:
    from neuroscribe import activations

    activations.extract_shard(
        manifest=a["manifest"],
        target=TargetSpec.from_dict(a["target"]),
        layers=[LayerSpec(**layer) for layer in a["layers"]],
        shard=a["shard"],
        n_shards=a["n_shards"],
        out=a["out"],
        batch_size=a["batch_size"],
        workers=a["workers"],
        device=a["device"],
        dtype=a["dtype"],
    )


def _merge(a: dict[str, Any]) -> None:
    from neuroscribe import merge

    target = TargetSpec.from_dict(a["target"])
    merge.merge_layer(a["shards"], target, target.layer(a["layer"]), a["out"], a["top_k"])


def _exemplars(a: dict[str, Any]) -> None:
    from neuroscribe import exemplars

    exemplars.chunk_exemplars(
        layer_h5=a["layer_h5"],
        manifest=a["manifest"],
        target=TargetSpec.from_dict(a["target"]),
        layer=a["layer"],
        neurons=a["neurons"],
        out=a["out"],
        top_k=a["top_k"],
        crops=a["crops"],
        batch_size=a["batch_size"],
        workers=a["workers"],
        device=a["device"],
        dtype=a["dtype"],
        save_every=a["save_every"],
    )


def _captions(a: dict[str, Any]) -> None:
    from neuroscribe.methods.dnd import stages as dnd

    dnd.caption_chunk(
        exemplars=a["exemplars"],
        manifest=a["manifest"],
        out=a["out"],
        captioner=a["captioner"],
        worlds=a["worlds"],
        cache=a["cache"],
        device=a["device"],
        dtype=a["dtype"],
    )


def _concepts(a: dict[str, Any]) -> None:
    from neuroscribe.methods.dnd import stages as dnd

    dnd.concept_chunk(
        captions=a["captions"],
        out=a["out"],
        llm=a["llm"],
        cache=a["cache"],
        device=a["device"],
        dtype=a["dtype"],
        max_failed_fraction=a["max_failed_fraction"],
    )


def _synthesis(a: dict[str, Any]) -> None:
    from neuroscribe.methods.dnd import stages as dnd

    dnd.synthesize_chunk(
        concepts=a["concepts"],
        out=a["out"],
        synthesizer=a["synthesizer"],
        store=a["store"],
        device=a["device"],
        dtype=a["dtype"],
    )


def _scores(a: dict[str, Any]) -> None:
    from neuroscribe.methods.dnd import stages as dnd

    dnd.score_chunk(
        concepts=a["concepts"],
        synthesis=a["synthesis"],
        exemplars=a["exemplars"],
        manifest=a["manifest"],
        out=a["out"],
        target=TargetSpec.from_dict(a["target"]),
        layer=a["layer"],
        scoring=a["scoring"],
        top_k=a["top_k"],
        settings=a["settings"],
        save_every=a["save_every"],
        max_failed_fraction=a["max_failed_fraction"],
    )


def _evaluate(a: dict[str, Any]) -> None:
    from neuroscribe.demo import evaluation

    evaluation.write_evaluation(
        a["descriptions"], a["manifest"], a["worlds"], a["targets"], a["out"]
    )


def _describe(a: dict[str, Any]) -> None:
    from neuroscribe import describe

    describe.write_descriptions(
        a["exemplars"],
        a["models"],
        a["methods"],
        a["parquet"],
        a["csv"],
        captions=a.get("captions", []),
        concepts=a.get("concepts", []),
        synthesis=a.get("synthesis", []),
        scores=a.get("scores", []),
    )


def _plan(a: dict[str, Any]) -> None:
    from neuroscribe.plan import (
        cluster_jobs,
        format_plan,
        memory_warnings,
        observe_concepts,
        observe_memory,
    )

    plan = observe_concepts(a["plan"], a.get("images_per_concept", 10))
    plan = observe_memory(plan, a["resources"])
    if "cluster" in a:
        plan["cluster"] = cluster_jobs(plan["jobs"], a["cluster"])
    write_json(plan, a["out"])
    print(format_plan(plan))
    for warning in memory_warnings(plan):
        print(warning)
    print(f"plan written to {a['out']}")


def _check_weights(a: dict[str, Any]) -> None:
    from neuroscribe import weights

    record = weights.check_weights(TargetSpec.from_dict(a["target"]), a["weights"], a["out"])
    print(
        f"{record.target}: {record.weights} ({record.format}, {record.tensors} tensors, "
        f"{record.parameters:,} values) fits {record.spec}"
    )


def _prefetch(a: dict[str, Any]) -> None:
    from neuroscribe import prefetch

    prefetch.run_prefetch([prefetch.ModelRef(**m) for m in a["models"]])


STAGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "render-demo": _render_demo,
    "train": _train,
    "manifest": _manifest,
    "activations": _activations,
    "merge": _merge,
    "exemplars": _exemplars,
    "captions": _captions,
    "concepts": _concepts,
    "synthesis": _synthesis,
    "scores": _scores,
    "describe": _describe,
    "evaluate": _evaluate,
    "plan": _plan,
    "check-weights": _check_weights,
    "prefetch": _prefetch,
}


def check_config(paths: list[str]) -> int:
    """`neuroscribe check-config FILE...`: the files as --configfile layers them, checked."""
    from neuroscribe.config import ConfigError
    from neuroscribe.configfiles import check_config_files

    try:
        print(check_config_files(paths))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check-config"] and len(argv) > 1:
        return check_config(argv[1:])
    if len(argv) != 2 or argv[0] not in STAGES:
        print(
            f"usage: python -m neuroscribe {{{','.join(STAGES)}}} JSON_ARGUMENTS\n"
            "       python -m neuroscribe check-config CONFIG_FILE...",
            file=sys.stderr,
        )
        return 2
    args = json.loads(argv[1])
    # an API key must not reach the job log, even inside an error a server echoed back
    secrets = secret_values([(args.get("llm") or {}).get("api_key_env")])
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter(secrets))
    logging.basicConfig(
        level=logging.INFO,
        handlers=[handler],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        STAGES[argv[0]](args)
    except Exception:
        print(redact(traceback.format_exc(), secrets), file=sys.stderr, end="")
        return 1
    return 0
