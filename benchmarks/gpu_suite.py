"""Every GPU figure of the project in one command that fits a 10-minute GPU window.

Parts, in order, each in its own process (its peak GPU memory its own, a hang cut off at the
time left) and each sized to the time left:

1. activations: `activations.py --size real` (ResNet-50, all of layer1-4 and fc, thousands of
   rendered 500x375 JPEGs, `--workers` = the machine's cores): pipeline against a bare forward.
2. units: the cost of one unit of each GPU stage, measured directly with the package's own
   backends: one image drawn by Stable Diffusion 1.5 at the paper's settings (50 steps, guidance
   7.5) and at `config/fast.yaml`'s, one BLIP-large caption, one CLIP ViT-B/16 embedding. With
   them the next parts are sized and their per-neuron figures derived and cross-checked.
3. paper: `throughput.py --size real`: the pipeline (snakemake on the chunk jobs) on N neurons
   against the reference structure on M neurons, paper settings.
4. fast: the same pipeline under `--preset fast` (the reference does not change with it).

From these it projects the GPU-hours of `config/config.yaml`'s dissection (every channel of
ResNet-50 layer1-4 and fc: 4,840 neurons, ImageNet's 50,000 validation images), in both presets,
against the paper's 38.8 s per neuron on a V100 (52.2 V100-hours), and writes `calibration.json`,
which `snakemake plan` reads (config key `plan.calibration`) to estimate GPU-hours per stage.

    python benchmarks/gpu_suite.py --out /scratch/gpu-suite            # one GPU, < 8 minutes
    python benchmarks/gpu_suite.py --out /tmp/suite --smoke            # CPU, tiny, a few minutes

The real-size models are built with random weights (benchmarks/realsize.py; same cost per image
as the trained ones). Output: a readable log, then one line of JSON with every figure; both are
also written to `--out` (suite.log, suite.json), with calibration.json and each part's raw JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "workflow"))  # the package, where it is not installed

# config/config.yaml's dissection: ResNet-50 layer1-4 (256 + 512 + 1024 + 2048 channels) and fc
CONFIG_WIDTHS = (256, 512, 1024, 2048, 1000)
CONFIG_NEURONS = sum(CONFIG_WIDTHS)
CONFIG_LAYERS = "layer1,layer2,layer3,layer4,fc"
CONFIG_PROBE_IMAGES = 50_000  # the ImageNet validation set
CHUNK_SIZE = 128  # the workflow's default neurons per chunk job
PAPER_S_PER_NEURON = 38.8  # Describe-and-Dissect's reported cost on a V100
DEFAULT_BUDGET_S = 450  # the whole suite; the limit is 8 minutes
# the workflow's DnD chunk stages whose jobs use the GPU, as the plan names them
DND_STAGES = ("exemplars", "captions", "synthesis", "scores")


class Log:
    """Prints and keeps every line, for suite.log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def gpu_name(device: str) -> str | None:
    if device == "cpu":
        return None
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def run_part(
    log: Log, name: str, cmd: list[str], timeout_s: float, device: str
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Run one part's command; returns the last JSON line it printed (None on failure) and what
    running it cost: wall seconds, peak GPU memory (nvidia-smi, all processes), status."""
    from throughput import GpuMemory

    log(f"== {name}: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    with GpuMemory(device) as memory:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout_s, 1))
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            out = proc.stdout
            err = proc.stderr
        except subprocess.TimeoutExpired as e:
            status = f"timed out after {timeout_s:.0f} s"
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    cost = {
        "status": status,
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_gpu_mib": memory.peak_mib,
    }
    lines = out.strip().splitlines()
    for line in lines:
        if not line.startswith("{"):
            log(f"   {line}")
    if status != "ok":
        log(f"   {name} {status}; the end of its errors:")
        for line in err.strip().splitlines()[-15:]:
            log(f"   ! {line}")
    peak = "not read (no GPU)" if memory.peak_mib is None else f"{memory.peak_mib} MiB"
    log(f"   {name}: {status}, {cost['wall_s']} s, peak GPU memory {peak}")
    found = [line for line in lines if line.startswith("{")]
    return (json.loads(found[-1]) if found and status == "ok" else None), cost


def units_command(
    workdir: Path, size: str, device: str, batch: int, steps: int | None
) -> list[str]:
    args = {"workdir": str(workdir), "size": size, "device": device, "batch": batch}
    args["steps"] = steps
    return [sys.executable, str(Path(__file__).resolve()), "--child-units", json.dumps(args)]


def measure_units(
    workdir: str, size: str, device: str, batch: int, steps: int | None
) -> dict[str, Any]:
    """Seconds per unit of each model stage, with the package's backends: each model's load,
    then one warm-up call and one timed batch of `batch` images. The models are built in the
    throughput parts' workdir, which then reuses them."""
    import diffusers
    import torch
    import transformers
    import yaml
    from PIL import Image
    from throughput import SIZES, build_models

    from neuroscribe import backends
    from neuroscribe.backends.captioners import CaptionRequest
    from neuroscribe.backends.similarity import ClipSimilarity
    from neuroscribe.imagestore import ImageRequest

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    models = build_models(Path(workdir), size)
    fast = yaml.safe_load((REPO / "config" / "fast.yaml").read_text())["dnd"]["synthesizer"]

    def timed(fn: Any) -> tuple[Any, float]:
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        if device != "cpu":
            torch.cuda.synchronize()
        return value, time.perf_counter() - start

    out: dict[str, Any] = {"batch": batch}
    settings = {"paper": (steps or SIZES[size]["steps"], 7.5)}
    settings["fast"] = (fast["steps"], fast["guidance"])
    for preset, (n_steps, guidance) in settings.items():
        cfg = {"backend": "diffusers", "model": models["sd"], "steps": n_steps}
        cfg |= {"guidance": guidance, "size": SIZES[size]["sd_px"], "scheduler": None}
        drawer, load_s = timed(lambda c=cfg: backends.synthesizer(c, device, "auto"))
        requests = [ImageRequest("a red cube", "a photo of a red cube", i) for i in range(batch)]
        drawer.draw(requests[:1])  # warm-up: kernel selection, the allocator's first blocks
        _, draw_s = timed(lambda d=drawer, r=requests: d.draw(r))
        out[f"draw_{preset}"] = {
            "steps": n_steps,
            "guidance": guidance,
            "load_s": load_s,
            "s_per_image": draw_s / batch,
            "s_per_image_step": draw_s / batch / n_steps,
        }
        drawer = None  # frees its GPU memory before the next model loads
    photo = Image.new("RGB", (500, 375), (120, 90, 60))
    path = Path(workdir) / "unit.jpg"
    photo.save(path)
    blip = {"backend": "blip", "model": models["blip"], "batch_size": batch}
    blip |= {"max_new_tokens": 30, "num_beams": 1}
    captioner, load_s = timed(lambda: backends.captioner(blip, [], device, "auto"))
    requests = [CaptionRequest(image_id=str(i), path=str(path)) for i in range(batch)]
    captioner.caption(requests[:1])
    _, caption_s = timed(lambda: captioner.caption(requests))
    out["caption"] = {"load_s": load_s, "s_per_image": caption_s / batch}
    captioner = None  # frees its GPU memory before CLIP loads
    clip, load_s = timed(lambda: ClipSimilarity(models["clip"], device=device, dtype="auto"))
    clip.embed([photo])
    _, embed_s = timed(lambda: clip.embed([photo] * batch))
    out["clip"] = {"load_s": load_s, "s_per_image": embed_s / batch}
    if device != "cpu":
        out["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# -- sizing ----------------------------------------------------------------------------------
# candidates per neuron (the `dnd.candidates` default): with a random captioner they rarely
# repeat between neurons, so sizing assumes every neuron draws all of them (the run then
# measures the real count)
SIZING_CANDIDATES = 5
# seconds of job start-up and model loads per pipeline run, besides the loads timed in units
SIZING_FIXED_S = 60.0


def reference_cost(units: dict[str, Any], top_k: int, per_concept: int) -> float:
    """Estimated seconds per reference neuron: every model loaded, K captions, every draw."""
    loads = sum(units[k]["load_s"] for k in ("draw_paper", "caption", "clip"))
    draws = SIZING_CANDIDATES * per_concept * units["draw_paper"]["s_per_image"]
    return loads + draws + top_k * units["caption"]["s_per_image"]


def pipeline_cost(units: dict[str, Any], preset: str, neurons: int, per_concept: int) -> float:
    """Estimated seconds of one pipeline run of `neurons` neurons."""
    loads = sum(units[k]["load_s"] for k in (f"draw_{preset}", "caption", "clip"))
    per_neuron = SIZING_CANDIDATES * per_concept * units[f"draw_{preset}"]["s_per_image"]
    return SIZING_FIXED_S + 2 * loads + neurons * per_neuron


def choose_sizes(units: dict[str, Any], left_s: float, size: dict[str, Any]) -> dict[str, int]:
    """Pipeline and reference neurons that fit `left_s` for the paper and fast parts: the
    reference at most a quarter of it, the paper pipeline at most 60 % of the rest."""
    q = size["images_per_concept"]
    one = reference_cost(units, size["top_k"], q)
    reference = size["most_reference"] if size["most_reference"] * one <= left_s / 4 else 1
    left = left_s - reference * one
    neurons = size["most_neurons"]

    def cost(preset: str) -> float:
        return pipeline_cost(units, preset, neurons, q)

    while neurons > size["fewest_neurons"] and (
        cost("paper") > 0.6 * left or cost("paper") + cost("fast") > left
    ):
        neurons = max(neurons // 2, size["fewest_neurons"])
    return {"pipeline_neurons": neurons, "reference_neurons": reference}


# -- projection -------------------------------------------------------------------------------
def derived_per_neuron(pipeline: dict[str, Any], units: dict[str, Any], preset: str) -> float:
    """Model seconds per neuron: the work the pipeline did per neuron times the unit costs."""
    return (
        pipeline["diffusion_images"] * units[f"draw_{preset}"]["s_per_image"]
        + pipeline["captioned_images"] * units["caption"]["s_per_image"]
        + pipeline["similarity_forward_images"] * units["clip"]["s_per_image"]
    )


def project(
    figures: dict[str, Any], units: dict[str, Any] | None, activations: dict[str, Any] | None
) -> dict[str, Any]:
    """GPU-hours of config/config.yaml's dissection from one preset's throughput figures."""
    pipeline = figures["pipeline"]
    n = pipeline["neurons"]
    chunks = sum(math.ceil(w / CHUNK_SIZE) for w in CONFIG_WIDTHS)
    out: dict[str, Any] = {"neurons": CONFIG_NEURONS, "chunks": chunks}
    extraction_h = 0.0
    if activations:
        extraction_h = CONFIG_PROBE_IMAGES / activations["pipeline_img_per_s"] / 3600
        out["activations_gpu_h"] = extraction_h
    # as measured: the benchmark's wall time per neuron, with its one chunk's fixed costs
    out["measured_s_per_neuron"] = pipeline["wall_s"]
    out["gpu_h_at_measured_s_per_neuron"] = (
        CONFIG_NEURONS * pipeline["wall_s"] / 3600 + extraction_h
    )
    if units:
        # derived: the models' time per neuron from the unit costs; what the benchmark spent
        # beyond it is fixed per chunk (job start-up, model loads), paid once per 128 neurons
        marginal = derived_per_neuron(pipeline, units, figures["preset"])
        fixed = max((pipeline["wall_s"] - marginal) * n, 0.0)
        out |= {"derived_s_per_neuron": marginal, "fixed_s_per_chunk": fixed}
        out["projected_gpu_h"] = (CONFIG_NEURONS * marginal + chunks * fixed) / 3600 + extraction_h
    out["paper_v100_h"] = CONFIG_NEURONS * PAPER_S_PER_NEURON / 3600
    if figures.get("reference"):
        out["reference_gpu_h"] = CONFIG_NEURONS * figures["reference"]["wall_s"] / 3600
    return out


def calibration(
    gpu: str | None, device: str, parts: dict[str, Any], units: dict[str, Any] | None
) -> dict[str, Any]:
    """What `snakemake plan` needs for GPU-hours per stage: seconds per probe image of the
    activations, and per preset the seconds per neuron of each DnD chunk stage."""
    presets = {}
    for preset in ("paper", "fast"):
        figures = parts.get(preset)
        if not figures:
            continue
        n = figures["pipeline"]["neurons"]
        stages = figures["stages"]
        presets[preset] = {
            "steps": figures["settings"]["pipeline_steps"],
            "neurons_measured": n,
            "s_per_neuron": {s: stages[s]["wall_s"] / n for s in DND_STAGES if s in stages},
        }
    acts = parts.get("activations")
    return {
        "source": "benchmarks/gpu_suite.py",
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu": gpu or f"none ({device})",
        "target": acts["config"]["model"] if acts else None,
        "activations_s_per_image": 1 / acts["pipeline_img_per_s"] if acts else None,
        "presets": presets,
        "units": units,
    }


# -- the suite ----------------------------------------------------------------------------------
def sizes(smoke: bool, cores: int) -> dict[str, Any]:
    """Every size the suite starts from (the pipeline's neurons are then fitted to the time)."""
    if smoke:
        return {
            "size": "tiny",
            "activation_model": None,  # the demo CNN of activations.py --size tiny
            "activation_images": 128,
            "workers": 1,
            "throughput_images": 60,
            "most_neurons": 4,
            "fewest_neurons": 2,
            "most_reference": 1,
            "top_k": 3,
            "images_per_concept": 2,
            "steps": 2,
            "unit_batch": 2,
        }
    return {
        "size": "real",
        "activation_model": "torchvision:resnet50",  # config/config.yaml's target
        "activation_images": 4096,
        "workers": cores,
        "throughput_images": 400,
        "most_neurons": 32,
        "fewest_neurons": 4,
        "most_reference": 2,
        "top_k": 10,
        "images_per_concept": 10,
        "steps": 50,
        "unit_batch": 8,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the log and JSON (required)")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, a few minutes")
    parser.add_argument("--workdir", type=Path, help="models and runs (default: OUT/work)")
    parser.add_argument(
        "--budget-s", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole suite"
    )
    parser.add_argument("--child-units", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_units:
        print(json.dumps(measure_units(**json.loads(args.child_units))), flush=True)
        return 0
    if args.out is None:
        parser.error("--out DIR is required: the folder for the log and the JSON figures")
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.workdir or args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "suite.log")
    device = "cpu" if args.smoke else "cuda"
    cores = os.cpu_count() or 2
    size = sizes(args.smoke, cores)
    gpu = gpu_name(device)
    if device == "cuda" and gpu is None:
        raise SystemExit("no CUDA GPU: run on a GPU node, or use --smoke to check the suite on CPU")
    log(f"neuroscribe GPU suite, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    log(f"GPU: {gpu or 'none'}; {cores} CPU cores; Python {platform.python_version()}")
    log(f"budget {args.budget_s:.0f} s; sizes: {json.dumps(size)}")

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    python = [sys.executable]
    parts: dict[str, Any] = {}
    costs: dict[str, Any] = {}
    acts_cmd = [*python, str(HERE / "activations.py"), "--size", size["size"], "--device", device]
    acts_cmd += ["--images", str(size["activation_images"]), "--workers", str(size["workers"])]
    if size["activation_model"]:
        acts_cmd += ["--model", size["activation_model"], "--layers", CONFIG_LAYERS]
    acts_cmd += ["--repeats", "1" if args.smoke else "2", "--memory-scale", "0"]
    acts_cmd += ["--workdir", str(work / "activations")]
    parts["activations"], costs["activations"] = run_part(
        log, "activations", acts_cmd, left(), device
    )
    units_cmd = units_command(
        work / "throughput", size["size"], device, size["unit_batch"], size["steps"]
    )
    parts["units"], costs["units"] = run_part(log, "units", units_cmd, left(), device)
    units = parts["units"]
    if units:
        chosen = choose_sizes(units, left(), size)
    else:
        chosen = {"pipeline_neurons": size["fewest_neurons"], "reference_neurons": 1}
    log(f"   sized to the {left():.0f} s left: {json.dumps(chosen)}")
    for preset in ("paper", "fast"):
        out = args.out / f"throughput-{preset}.json"
        cmd = [*python, str(HERE / "throughput.py"), "--size", size["size"], "--device", device]
        cmd += ["--preset", preset, "--neurons", str(chosen["pipeline_neurons"])]
        # the reference draws with the paper's settings whatever the preset: timed once
        reference = chosen["reference_neurons"] if preset == "paper" else 0
        cmd += ["--reference-neurons", str(reference), "--images", str(size["throughput_images"])]
        cmd += ["--top-k", str(size["top_k"]), "--steps", str(size["steps"])]
        cmd += ["--images-per-concept", str(size["images_per_concept"])]
        cmd += ["--workdir", str(work / "throughput")]
        cmd += ["--json", str(out)]
        # the fast part gets what is left; the paper part leaves it a share
        budget = left() if preset == "fast" else left() * 0.7
        _, costs[preset] = run_part(log, preset, cmd, budget, device)
        parts[preset] = json.loads(out.read_text()) if costs[preset]["status"] == "ok" else None
        if parts[preset] is None:
            out.unlink(missing_ok=True)
    if parts.get("fast") and parts.get("paper") and parts["paper"].get("reference"):
        parts["fast"]["reference"] = parts["paper"]["reference"]
    summary = summarise(parts, costs, units, gpu, device, size, chosen, start)
    report(log, summary)
    (args.out / "calibration.json").write_text(
        json.dumps(calibration(gpu, device, parts, units), indent=1)
    )
    (args.out / "suite.json").write_text(json.dumps(summary, indent=1))
    log(json.dumps(summary))
    return 0 if all(c["status"] == "ok" for c in costs.values()) else 1


def summarise(
    parts: dict[str, Any],
    costs: dict[str, Any],
    units: dict[str, Any] | None,
    gpu: str | None,
    device: str,
    size: dict[str, Any],
    chosen: dict[str, int],
    start: float,
) -> dict[str, Any]:
    """Every figure of the suite, as one JSON object."""
    acts = parts.get("activations")
    summary: dict[str, Any] = {
        "suite": "gpu_suite",
        "gpu": gpu,
        "device": device,
        "sizes": size | chosen,
        "parts": costs,
        "wall_s": round(time.perf_counter() - start, 1),
        "activations": acts
        and {
            "images": acts["config"]["images"],
            "bare_img_per_s": acts["bare_img_per_s"],
            "pipeline_img_per_s": acts["pipeline_img_per_s"],
            "ratio": acts["ratio"],
            "target_ratio": acts["target_ratio"],
        },
        "units": units,
    }
    for preset in ("paper", "fast"):
        figures = parts.get(preset)
        if not figures:
            summary[preset] = None
            continue
        pipe, ref = figures["pipeline"], figures.get("reference")
        summary[preset] = {
            "pipeline": pipe,
            "reference": ref,
            "speedup": ref["wall_s"] / pipe["wall_s"] if ref else None,
            "derived_s_per_neuron": units and derived_per_neuron(pipe, units, preset),
            "stages": figures["stages"],
            "peak_gpu_mib": figures["peak_gpu_mib"],
            "projection": project(figures, units, acts),
        }
    return summary


def report(log: Log, summary: dict[str, Any]) -> None:
    """The figures, readable, against the targets."""
    log("")
    log(f"== figures ({summary['gpu'] or summary['device']}, {summary['wall_s']} s in all)")
    acts = summary["activations"]
    if acts:
        met = "met" if acts["ratio"] <= acts["target_ratio"] else "not met"
        log(
            f"activations: {acts['images']} images, bare {acts['bare_img_per_s']:.0f} img/s, "
            f"pipeline {acts['pipeline_img_per_s']:.0f} img/s, ratio {acts['ratio']:.2f} "
            f"(target <= {acts['target_ratio']}: {met})"
        )
    units = summary["units"]
    if units:
        for key in ("draw_paper", "draw_fast", "caption", "clip"):
            u = units[key]
            log(f"unit {key}: {u['s_per_image'] * 1000:.1f} ms per image, load {u['load_s']:.1f} s")
    for preset, target in (("paper", "speedup >= 5x"), ("fast", "<= 1 s per neuron")):
        figures = summary[preset]
        if not figures:
            log(f"{preset}: not measured ({summary['parts'].get(preset, {}).get('status')})")
            continue
        pipe, ref = figures["pipeline"], figures["reference"]
        line = f"{preset}: pipeline {pipe['wall_s']:.2f} s per neuron ({pipe['neurons']} neurons"
        line += f", {pipe['diffusion_images']:.1f} images drawn per neuron)"
        if ref:
            line += f", reference {ref['wall_s']:.2f} s per neuron ({ref['neurons']} neurons)"
            line += f", speedup {figures['speedup']:.1f}x"
        log(f"{line}; target {target}")
        if figures["derived_s_per_neuron"] is not None:
            log(
                f"   derived from the unit costs: {figures['derived_s_per_neuron']:.2f} s per neuron"
            )
        p = figures["projection"]
        projected = p.get("projected_gpu_h")
        log(
            f"   config/config.yaml ({p['neurons']} neurons): "
            + (f"{projected:.1f} GPU-hours projected, " if projected is not None else "")
            + f"{p['gpu_h_at_measured_s_per_neuron']:.1f} at the measured s per neuron; "
            f"the paper: {p['paper_v100_h']:.1f} V100-hours (38.8 s per neuron)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
