"""Model load time and peak host memory, with and without the `accelerate` package.

Without `accelerate`, diffusers logs "Cannot initialize model with low cpu memory usage because
`accelerate` was not found" and loads each model (UNet, VAE) with `low_cpu_mem_usage=False`
(allocated parameters, not meta tensors); transformers 5 does not use `accelerate` for a plain
load. This script measures what the package costs or gains for the paper's models at real size (benchmarks/realsize.py: random weights, real architectures), loaded by the
package's own classes as the jobs load them, on the CPU:

- sd15: `DiffusersSynthesizer` (diffusers `AutoPipelineForText2Image.from_pretrained`);
- blip-large: `BlipCaptioner` (transformers `BlipForConditionalGeneration.from_pretrained`);
- clip-b16: `ClipSimilarity` (transformers `CLIPModel.from_pretrained`).

Each measurement is a fresh subprocess (`--child MODEL MODE`). It imports torch, diffusers,
transformers and the model's classes first (timed alone: "import s"), then times the
construction of the package object ("load s": config, processor/tokenizer, weights,
`.to(device)`) and reads the peak resident set size VmHWM from /proc/self/status ("peak MB
after load"; it includes the interpreter and libraries: "base MB" is VmRSS after the imports).
A checkpoint that is memory-mapped (safetensors) and needs no dtype conversion is read from disk
only when its weights are first used (a GPU job's `.to("cuda")` reads them all), so the child
then reads every parameter and buffer once ("read weights s") and takes VmHWM again ("peak MB
after read": the peak a job reaches once its models are in use). Mode
"without" hides `accelerate` from the child (even when it is installed); "with" needs it
importable (installed, or in the folder given by `--accelerate-path`). Each child reports
whether diffusers and transformers saw `accelerate` and whether the warning appeared on its
stderr. Modes alternate (the order flips every round) for `--repeats` rounds; the table shows
the best and the median. The model folders are built into `--workdir` once and reused.

    .venv/bin/python benchmarks/loading.py --workdir /tmp/loadbench --repeats 3 \\
        --accelerate-path /tmp/accel      # accelerate installed there with pip --target
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODELS = ("sd15", "blip-large", "clip-b16")
MODES = ("without", "with")
WARNING = "Cannot initialize model with low cpu memory usage"


def build_models(workdir: Path, models: list[str]) -> dict[str, Path]:
    """The real-size model folders under `workdir`, built (benchmarks/realsize.py) when missing."""
    folders = {name: workdir / name for name in models}
    missing = [name for name, folder in folders.items() if not (folder / "done").exists()]
    if missing:
        sys.path.insert(0, str(REPO / "benchmarks"))
        import realsize

        builders = {
            "sd15": realsize.build_sd15,
            "blip-large": realsize.build_blip_large,
            "clip-b16": realsize.build_clip_b16,
        }
        for name in missing:
            print(f"building {name} into {folders[name]} ...", flush=True)
            builders[name](folders[name])
            (folders[name] / "done").touch()
    return folders


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def touch_weights(loader: Any) -> float:
    """Read every parameter and buffer of the loaded models once; the clock after."""
    import torch

    pipe = getattr(loader, "pipe", None)
    parts = pipe.components.values() if pipe is not None else [loader.model]
    with torch.inference_mode():
        for part in parts:
            if isinstance(part, torch.nn.Module):
                for tensor in [*part.parameters(), *part.buffers()]:
                    tensor.sum()
    return time.perf_counter()


def child(model: str, mode: str, folder: str, dtype: str, accelerate_path: str | None) -> None:
    """One measurement in this (fresh) process; prints one JSON line."""
    start = time.perf_counter()
    if mode == "without":
        sys.modules["accelerate"] = None  # type: ignore[assignment]  # import and find_spec fail
    elif accelerate_path:
        sys.path.insert(0, accelerate_path)
    import diffusers.utils
    import transformers.utils

    from neuroscribe.backends.captioners import BlipCaptioner
    from neuroscribe.backends.similarity import ClipSimilarity
    from neuroscribe.backends.synthesizers import DiffusersSynthesizer

    # the classes the loaders reach for (transformers and diffusers import them lazily)
    if model == "sd15":
        from diffusers import (  # noqa: F401
            AutoencoderKL,
            AutoPipelineForText2Image,
            StableDiffusionPipeline,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401
    elif model == "blip-large":
        from transformers import AutoConfig, BlipForConditionalGeneration, BlipProcessor  # noqa: F401
    else:
        from transformers import AutoImageProcessor, CLIPModel  # noqa: F401
    loaders = {
        "sd15": DiffusersSynthesizer,
        "blip-large": BlipCaptioner,
        "clip-b16": ClipSimilarity,
    }
    imported = time.perf_counter()
    base_mb = _status_mb("VmRSS")
    loader = loaders[model](model=folder, device="cpu", dtype=dtype)
    loaded = time.perf_counter()
    peak_load_mb = _status_mb("VmHWM")
    # weights of a memory-mapped checkpoint are read from disk (and count in RSS) only on first
    # use; a GPU job's `.to("cuda")` reads them all: so read every weight once, timed apart
    touched = touch_weights(loader)
    result = {
        "model": model,
        "mode": mode,
        "import_s": imported - start,
        "load_s": loaded - imported,
        "touch_s": touched - loaded,
        "base_mb": base_mb,
        "peak_load_mb": peak_load_mb,
        "peak_mb": _status_mb("VmHWM"),
        "diffusers_sees_accelerate": diffusers.utils.is_accelerate_available(),
        "transformers_sees_accelerate": transformers.utils.is_accelerate_available(),
    }
    print(json.dumps(result), flush=True)


def measure(
    model: str, mode: str, folder: Path, dtype: str, accelerate_path: str | None
) -> dict[str, Any]:
    """Run one child process; its result plus whether the diffusers warning appeared."""
    command = [sys.executable, __file__, "--child", model, mode, "--folder", str(folder)]
    command += ["--dtype", dtype]
    if accelerate_path:
        command += ["--accelerate-path", accelerate_path]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{model} {mode} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["warning"] = WARNING in proc.stderr
    if mode == "with" and not result["diffusers_sees_accelerate"]:
        raise RuntimeError("accelerate is not importable: install it or pass --accelerate-path")
    return result


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best and median per (model, mode)."""
    rows = []
    for model in dict.fromkeys(r["model"] for r in runs):
        for mode in MODES:
            group = [r for r in runs if r["model"] == model and r["mode"] == mode]
            if not group:
                continue
            row: dict[str, Any] = {"model": model, "mode": mode, "n": len(group)}
            for key in ("load_s", "peak_load_mb", "touch_s", "peak_mb", "import_s", "base_mb"):
                values = [r[key] for r in group]
                row[f"{key}_best"] = min(values)
                row[f"{key}_median"] = statistics.median(values)
            row["warning"] = any(r["warning"] for r in group)
            row["sees_accelerate"] = all(r["diffusers_sees_accelerate"] for r in group)
            rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The summary as a markdown table."""
    print(
        "| model | accelerate | load s | peak MB after load | read weights s | peak MB after read "
        "| import s | base MB | warning | n |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")

    def cell(row: dict[str, Any], key: str, digits: int) -> str:
        return f"{row[key + '_best']:.{digits}f} / {row[key + '_median']:.{digits}f}"

    for r in rows:
        print(
            f"| {r['model']} | {r['mode']} | {cell(r, 'load_s', 2)} | {cell(r, 'peak_load_mb', 0)} "
            f"| {cell(r, 'touch_s', 2)} | {cell(r, 'peak_mb', 0)} | {r['import_s_median']:.1f} "
            f"| {r['base_mb_median']:.0f} | {'yes' if r['warning'] else 'no'} | {r['n']} |"
        )
    print("(best / median over n runs; import s and base MB: median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loadbench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument(
        "--dtype",
        default="float16",
        help="the loaders' dtype: float16 is what GPU jobs load (`auto` on CUDA), float32 CPU jobs",
    )
    parser.add_argument("--accelerate-path", help="a folder with accelerate in it (pip --target)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.folder, args.dtype, args.accelerate_path)
        return

    folders = build_models(args.workdir, args.models)
    load_before = os.getloadavg()
    runs = []
    for round_ in range(args.repeats):
        modes = MODES if round_ % 2 == 0 else MODES[::-1]
        for model in args.models:
            for mode in modes:
                run = measure(model, mode, folders[model], args.dtype, args.accelerate_path)
                print(
                    f"round {round_ + 1} {model:10} {mode:7} load {run['load_s']:6.2f} s "
                    f"peak {run['peak_load_mb']:6.0f} MB, read weights {run['touch_s']:5.2f} s "
                    f"peak {run['peak_mb']:6.0f} MB, warning={run['warning']}",
                    flush=True,
                )
                runs.append(run)
    load_after = os.getloadavg()
    rows = summarise(runs)
    print(f"\ndtype {args.dtype}, device cpu, {os.cpu_count()} CPUs")
    print(f"load average (1/5/15 min) before {load_before}, after {load_after}\n")
    print_table(rows)
    summary = {"dtype": args.dtype, "loadavg": [load_before, load_after], "summary": rows}
    print(json.dumps({**summary, "runs": runs}))


if __name__ == "__main__":
    main()
