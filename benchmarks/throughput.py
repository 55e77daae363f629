"""Describe-and-Dissect throughput: neuroscribe's pipeline against the reference code's structure.

One layer of N neurons (default 256) of a target on the demo world, with the real backends: a
BLIP captioner (transformers), concepts from an OpenAI-compatible server on 127.0.0.1 through the
`openai` client (tests/fake_openai.py), a Stable Diffusion pipeline (diffusers) and CLIP image
similarity. Both modes use the same models, inputs and settings, in one invocation:

- pipeline: the workflow as built (`snakemake` on the chunk jobs: batched across neurons, models
  loaded once per job, caches and the image store shared by the run);
- reference: the same package components driven one neuron at a time as the reference code
  does: every model loaded for each neuron, each exemplar captioned, one LLM request per caption
  simplification plus one per candidate summary, Q images drawn per candidate with no sharing,
  and the target and CLIP run on that neuron's images alone. Its cost per neuron does not depend
  on the other neurons, so it is timed on `--reference-neurons` of them (default 16).

Activation extraction and the top-K merge run first, untimed and shared (both modes need them).
Prints, per mode, wall seconds per neuron and the work per neuron, then the ratios.

    .venv/bin/python benchmarks/throughput.py --size tiny          # CPU, tiny random models
    .venv/bin/python benchmarks/throughput.py --size real --device cuda          # one GPU
    .venv/bin/python benchmarks/throughput.py --size real --device cuda --preset fast

`--size real` builds the paper's models with their real architectures and random weights
(benchmarks/realsize.py: BLIP-large, Stable Diffusion 1.5 at 512 px, CLIP ViT-B/16) and describes
N channels of layer3 of a ResNet-50 (random weights) on the demo world rendered at 224 px.
`--preset fast` runs the pipeline with config/fast.yaml's synthesis settings (steps, guidance);
the reference keeps the paper's. At `--size real` the preset's model (SD-Turbo, an SD 2.1 UNet
of about the same cost per step as SD 1.5's) is stood in for by the SD 1.5 architecture.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import pandas as pd
import transformers
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # tiny model builders and the fake OpenAI server

from fake_openai import fake_openai, labeller  # noqa: E402
from tiny_blip import build_tiny_blip  # noqa: E402
from tiny_diffusion import build_tiny_clip, build_tiny_sd  # noqa: E402

from conftest import snakemake_command  # noqa: E402
from neuroscribe import backends  # noqa: E402
from neuroscribe.backends.captioners import exemplar_requests  # noqa: E402
from neuroscribe.backends.synthesizers import PROMPT_TEMPLATE, image_seed  # noqa: E402
from neuroscribe.config import TargetSpec, derive, validate_config  # noqa: E402
from neuroscribe.exemplars import chunk_exemplars  # noqa: E402
from neuroscribe.imagestore import ImageRequest  # noqa: E402
from neuroscribe.methods.dnd import proposal  # noqa: E402
from neuroscribe.methods.dnd.concepts import build_proposer  # noqa: E402
from neuroscribe.methods.dnd.stages import score_chunk  # noqa: E402
from neuroscribe.report.figures import rule_times  # noqa: E402

# a target with one wide layer: N channels to describe
FACTORY = """
from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, {width}, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear({width}, 7),
    )
"""
LAYER = "2"  # the wide conv layer (module path inside the Sequential)
# per size: the described layer, probe image px, text-to-image px and steps (the paper: 50)
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"layer": LAYER, "probe_px": 64, "sd_px": 32, "steps": 10},
    "real": {"layer": "layer3", "probe_px": 224, "sd_px": 512, "steps": 50},
}


@dataclass
class Work:
    """Work done for the neurons of one mode."""

    neurons: int = 0
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n


def build_models(root: Path, size: str) -> dict[str, str]:
    """Local folders of the captioner, text-to-image model and CLIP of this size."""
    if size == "tiny":
        return {
            "blip": str(build_tiny_blip(root / "blip")),
            "sd": str(build_tiny_sd(root / "sd")),
            "clip": str(build_tiny_clip(root / "clip")),
        }
    import realsize

    built = {"blip": realsize.build_blip_large, "sd": realsize.build_sd15}
    built["clip"] = realsize.build_clip_b16
    # built once per workdir (the real-size folders take a minute and 4 GB), under a temporary
    # name first so that an interrupted build is never taken for a finished one
    for name, build in built.items():
        if not (root / name).exists():
            shutil.rmtree(root / f".{name}.tmp", ignore_errors=True)
            build(root / f".{name}.tmp").rename(root / name)
    return {name: str(root / name) for name in built}


def _target(root: Path, args: argparse.Namespace, demo_transform: dict[str, Any]) -> dict:
    if args.size == "tiny":  # a layer of exactly N channels
        (root / "wide.py").write_text(FACTORY.format(width=args.neurons))
        spec, transform = f"python:{root / 'wide.py'}:build", demo_transform
    else:
        spec, transform = "torchvision:resnet50", {"resize": 256, "crop": 224}
    layer = {"name": SIZES[args.size]["layer"], "neurons": f"0-{args.neurons - 1}"}
    return {
        "name": "wide",
        "spec": spec,
        "weights": None,
        "transform": transform,
        "layers": [layer],
    }


def build_config(root: Path, args: argparse.Namespace, server_url: str) -> Path:
    size = SIZES[args.size]
    models = build_models(root, args.size)
    cfg = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    cfg["run"] = "bench"
    # Describe-and-Dissect alone: the demo's other methods, evaluation and report are not timed
    cfg["methods"] = ["topk", "dnd"]
    cfg["evaluation"] = {"enabled": False}
    cfg["report"] = {"enabled": False}
    for other in ("tellme", "texplain", "clipdissect"):
        cfg.pop(other, None)
    cfg["targets"] = [_target(root, args, cfg["targets"][0]["transform"])]
    cfg["probe"]["datasets"][0] |= {"n_images": args.images, "image_size": size["probe_px"]}
    cfg |= {"chunk_size": 128, "shard_size": args.images, "top_k": args.top_k}
    cfg |= {"device": args.device}
    cfg["captioner"] = {"backend": "blip", "model": models["blip"]}
    cfg["llm"] = {
        "backend": "openai",
        "model": "fake-model",
        "base_url": server_url,
        "api_key_env": None,
    }
    synthesizer = {
        "backend": "diffusers",
        "model": models["sd"],
        "steps": args.steps or size["steps"],
        "size": size["sd_px"],
        "images_per_concept": args.images_per_concept,
    }
    if args.preset == "fast":
        fast = yaml.safe_load((REPO / "config" / "fast.yaml").read_text())["dnd"]["synthesizer"]
        synthesizer |= {"steps": fast["steps"], "guidance": fast["guidance"]}
    cfg["dnd"] = {
        "synthesizer": synthesizer,
        "scoring": {"similarity": {"backend": "clip", "model": models["clip"]}},
    }
    # on a GPU machine each job decodes images with a few DataLoader workers
    gpus, cpus = (0, 1) if args.device == "cpu" else (1, 4)
    for stage in ("captions", "synthesis", "scores", "exemplars", "activations"):
        cfg["resources"][stage] = {"gpus": gpus, "cpus": cpus, "mem_mb": 2000, "runtime": 60}
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(root: Path, config: Path, *targets: str) -> None:
    # every core of the machine (the tests' command says 2): jobs run side by side
    cores = str(os.cpu_count() or 2)
    cmd = snakemake_command(root, config, "--cores", cores, "--", *targets)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])


def _logged(logs: Path, pattern: str) -> int:
    """Sum of the first number group of `pattern` over the stage logs under `logs`."""
    text = "".join(p.read_text() for p in logs.rglob("*.log"))
    return sum(int(m.group(1)) for m in re.finditer(pattern, text))


def run_pipeline(root: Path, config: Path, server: Any, n: int) -> Work:
    results = root / "results" / "bench"
    before = len(server.requests)
    start = time.perf_counter()
    snakemake(root, config)
    work = Work(neurons=n, seconds=time.perf_counter() - start)
    logs = results / "logs"
    work.add("llm requests", len(server.requests) - before)
    work.add("llm prompt tokens", _tokens(server.requests[before:], server))
    work.add("captioned images", _logged(logs / "captions", r"(\d+) captioned by"))
    drawn = _logged(logs / "synthesis", r"(\d+) drawn now")
    work.add("diffusion images", drawn)
    work.add(
        "denoising steps", drawn * yaml.safe_load(config.read_text())["dnd"]["synthesizer"]["steps"]
    )
    crops = _logged(logs / "exemplars", r"(\d+) attention crops for")
    images = _logged(logs / "exemplars", r"attention crops for \d+ neurons on (\d+) images")
    scored = _logged(logs / "scores", r"neurons, (\d+) synthesised and")
    exemplars = _logged(logs / "scores", r"synthesised and (\d+) exemplar images")
    work.add("target forward images", crops + images + scored)
    work.add("similarity forward images", scored + exemplars)
    return work


def _tokens(requests: list[dict[str, Any]], server: Any) -> int:
    # the fake server's usage counts whitespace words, as its replies report them
    return sum(server.completion(body, "")["usage"]["prompt_tokens"] for body in requests)


def the_layer(cfg: dict[str, Any]) -> dict[str, Any]:
    """The benchmark's one layer, {name, neurons}."""
    (layer,) = cfg["targets"][0]["layers"]
    return layer


def run_reference(
    root: Path, config: Path, server: Any, neurons: list[int], paper: dict[str, Any]
) -> Work:
    """The reference code's structure: one neuron at a time, nothing shared or kept; text-to-image
    with the `paper` settings (steps, guidance) whatever the pipeline's preset."""
    cfg = validate_config(yaml.safe_load(config.read_text()))
    results = root / "results" / "bench"
    layer = the_layer(cfg)
    name = layer["name"]
    target = TargetSpec.from_dict(
        cfg["targets"][0] | {"layers": [{"pooling": "avg", "tokens": "cls", **layer}]}
    )
    manifest = results / "probe" / "manifest.parquet"
    layer_h5 = results / "activations" / "wide" / f"{name}.h5"
    synth = cfg["dnd"]["synthesizer"] | paper
    device = cfg["device"]
    # the paper's calls, with no cache: every request reaches the server
    llm = derive(cfg).llm(cfg) | proposal(cfg) | {"prompt_mode": "reference", "max_concurrency": 4}
    work = Work(neurons=len(neurons))
    before = len(server.requests)
    start = time.perf_counter()
    for neuron in neurons:
        folder = root / "reference" / str(neuron)
        folder.mkdir(parents=True)
        ex_file = folder / "exemplars.parquet"
        chunk_exemplars(
            layer_h5, manifest, target, name, [neuron], ex_file, cfg["top_k"], device=device
        )
        ex = pd.read_parquet(ex_file)
        work.add("target forward images", _crop_forwards(ex))
        captioner = backends.captioner(cfg["captioner"], [], device, "auto")  # loaded per neuron
        requests = exemplar_requests(ex, manifest)
        captions = captioner.caption(requests)
        work.add("captioned images", len(requests))
        (record,) = build_proposer(llm, None, device, "auto").propose([(neuron, captions)])
        drawer = backends.synthesizer(synth, device, "auto")  # loaded per neuron
        rows = []
        # one candidate per summary call, drawn for each even when two summaries agree
        cands = record.candidates
        for concept in [cands[i % len(cands)] for i in range(llm["candidates"])] if cands else []:
            prompt = PROMPT_TEMPLATE.format(concept=concept)
            seeds = [
                image_seed(synth["seed"], concept, i) for i in range(synth["images_per_concept"])
            ]
            images = drawer.draw([ImageRequest(concept, prompt, s) for s in seeds])
            files = []
            for s, image in zip(seeds, images, strict=True):
                files.append(str(folder / f"{len(rows)}-{s}.png"))
                image.save(files[-1])
            rows.append(
                {
                    "concept": concept,
                    "prompt": prompt,
                    "status": "ok",
                    "error": None,
                    "seeds": seeds,
                    "images": files,
                    "ignored_words": [],
                    "synthesizer": drawer.id,
                }
            )
            work.add("diffusion images", len(images))
            work.add("denoising steps", len(images) * synth["steps"])
        # one row per distinct candidate, holding every image drawn for it: all are scored
        by_concept: dict[str, dict[str, Any]] = {}
        for row in rows:
            kept = by_concept.setdefault(row["concept"], row | {"seeds": [], "images": []})
            kept["seeds"] += row["seeds"]
            kept["images"] += row["images"]
        pd.DataFrame(list(by_concept.values())).to_parquet(folder / "synthesis.parquet")
        concepts = pd.DataFrame(
            [{"neuron": neuron, "candidates": list(by_concept), "error": record.error}]
        )
        concepts.to_parquet(folder / "concepts.parquet")
        score_chunk(  # loads the target and CLIP for this neuron's images alone
            folder / "concepts.parquet",
            folder / "synthesis.parquet",
            ex_file,
            manifest,
            folder / "scores.parquet",
            target,
            name,
            cfg["dnd"]["scoring"],
            cfg["top_k"],
            {"batch_size": cfg["batch_size"], "workers": 0, "device": device, "dtype": "auto"},
        )
        n_images = sum(len(r["images"]) for r in rows)
        work.add("target forward images", n_images)
        work.add("similarity forward images", n_images + len(ex))
    work.seconds = time.perf_counter() - start
    work.add("llm requests", len(server.requests) - before)
    work.add("llm prompt tokens", _tokens(server.requests[before:], server))
    return work


def _crop_forwards(ex: pd.DataFrame) -> int:
    # the neuron's top images once for their maps, and each crop candidate once for its score
    return ex["image_id"].nunique() + int(ex["box"].notna().sum())


def report(pipeline: Work, reference: Work | None) -> None:
    ref_counts = reference.counts if reference else {}
    keys = list(dict.fromkeys([*ref_counts, *pipeline.counts]))
    print(f"  {'per neuron':<28} {'reference':>12} {'pipeline':>12} {'ratio':>8}")
    rows = [("wall seconds", reference.seconds if reference else None, pipeline.seconds)]
    rows += [
        (k, ref_counts.get(k, 0) if reference else None, pipeline.counts.get(k, 0)) for k in keys
    ]
    for key, ref, pipe in rows:
        p = pipe / pipeline.neurons
        if reference is None or ref is None:
            print(f"  {key:<28} {'-':>12} {p:>12.2f} {'-':>8}")
            continue
        r = ref / reference.neurons
        ratio = f"{r / p:.1f}x" if p else "-"
        print(f"  {key:<28} {r:>12.2f} {p:>12.2f} {ratio:>8}")


def per_neuron(work: Work | None) -> dict[str, float] | None:
    """Wall seconds and work per neuron of one mode, for the JSON figures."""
    if work is None:
        return None
    figures = {"neurons": work.neurons, "wall_s": work.seconds / work.neurons}
    return figures | {k.replace(" ", "_"): v / work.neurons for k, v in work.counts.items()}


def stage_seconds(root: Path) -> dict[str, dict[str, float]]:
    """Per rule of the pipeline run, from its jobs' benchmark files: jobs and wall seconds."""
    bench = root / "results" / "bench" / "benchmarks"
    return {
        t.rule: {"jobs": t.jobs, "wall_s": t.hours * 3600, "max_rss_mb": t.max_rss_mb}
        for t in rule_times(bench, {})
    }


class GpuMemory:
    """Peak memory in use on the GPU while a block runs (all processes: the pipeline's jobs are
    subprocesses), sampled with nvidia-smi every 0.2 s; None without a GPU."""

    def __init__(self, device: str) -> None:
        self.enabled = device != "cpu" and shutil.which("nvidia-smi") is not None
        self.peak_mib: int | None = None
        self._stop = threading.Event()

    @staticmethod
    def query(field: str) -> str:
        cmd = ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i", "0"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            used = int(self.query("memory.used"))
            self.peak_mib = max(self.peak_mib or 0, used)

    def __enter__(self) -> GpuMemory:
        if self.enabled:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--neurons", type=int, default=256)
    parser.add_argument(
        "--reference-neurons", type=int, default=16, help="0: time the pipeline alone"
    )
    parser.add_argument("--images", type=int, default=400, help="probe images of the demo world")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument(
        "--steps", type=int, help="denoising steps, both modes (default: tiny 10, real 50)"
    )
    parser.add_argument(
        "--images-per-concept", type=int, default=10, help="Q, both modes (paper: 10)"
    )
    parser.add_argument(
        "--preset",
        choices=["paper", "fast"],
        default="paper",
        help="fast: the pipeline draws with config/fast.yaml's steps and guidance",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (both modes)")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the run here (per-job times: results/bench/benchmarks); the built models are "
        "reused by the next run in the same folder",
    )
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    args = parser.parse_args()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    steps = args.steps or SIZES[args.size]["steps"]
    paper = {"steps": steps, "guidance": 7.5}
    with tempfile.TemporaryDirectory() as tmp, fake_openai(default=labeller) as server:
        root = args.workdir or Path(tmp)
        for old in ("results", "reference", ".snakemake"):
            shutil.rmtree(root / old, ignore_errors=True)  # a timed run starts from nothing
        root.mkdir(parents=True, exist_ok=True)
        config = build_config(root, args, server.base_url)
        cfg = yaml.safe_load(config.read_text())
        layer_h5 = f"results/bench/activations/wide/{the_layer(cfg)['name']}.h5"
        snakemake(root, config, layer_h5)  # shared by both modes, untimed
        with GpuMemory(args.device) as pipe_mem:
            pipeline = run_pipeline(root, config, server, args.neurons)
        with GpuMemory(args.device) as ref_mem:
            reference = None
            if args.reference_neurons:
                reference = run_reference(
                    root, config, server, list(range(args.reference_neurons)), paper
                )
        stages = stage_seconds(root)
    synth = cfg["dnd"]["synthesizer"]
    print(
        f"Describe-and-Dissect on {args.neurons} neurons (--size {args.size}, --device "
        f"{args.device}, {args.images} probe images, K={args.top_k}, Q={args.images_per_concept}); reference timed on "
        f"{args.reference_neurons} neurons with {steps} steps, guidance 7.5; pipeline "
        f"(--preset {args.preset}) with {synth['steps']} steps, guidance {synth.get('guidance', 7.5)}"
    )
    gpu = GpuMemory.query("name") if pipe_mem.enabled else None
    if gpu:
        print(
            f"GPU: {gpu}; peak memory in use: pipeline {pipe_mem.peak_mib} "
            f"MiB, reference {ref_mem.peak_mib} MiB"
        )
    report(pipeline, reference)
    if args.json:
        figures = {
            "benchmark": "throughput",
            "size": args.size,
            "preset": args.preset,
            "device": args.device,
            "gpu": gpu,
            "settings": {
                "neurons": args.neurons,
                "reference_neurons": args.reference_neurons,
                "probe_images": args.images,
                "top_k": args.top_k,
                "images_per_concept": args.images_per_concept,
                "pipeline_steps": synth["steps"],
                "pipeline_guidance": synth.get("guidance", 7.5),
                "reference_steps": steps,
            },
            "pipeline": per_neuron(pipeline),
            "reference": per_neuron(reference),
            "stages": stages,
            "peak_gpu_mib": {"pipeline": pipe_mem.peak_mib, "reference": ref_mem.peak_mib},
        }
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
