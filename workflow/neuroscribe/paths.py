"""Every path under results/{run}/, built in one place: the rules and the package both use it.

Called without arguments, the per-model, per-layer and per-chunk paths return Snakemake patterns
(`{model}`, `{layer}`, `{chunk}`, `{shard}` left as wildcards); called with values, real paths.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL, LAYER, CHUNK, SHARD = "{model}", "{layer}", "{chunk}", "{shard}"


@dataclass(frozen=True)
class RunPaths:
    root: str  # results/{run}

    # -- probe set ----------------------------------------------------------------------------
    @property
    def manifest(self) -> str:
        return f"{self.root}/probe/manifest.parquet"

    @property
    def rejected(self) -> str:
        return f"{self.root}/probe/rejected.parquet"

    def demo_folder(self, dataset: str) -> str:
        """Where the workflow renders a `demo` dataset (images and annotations)."""
        return f"{self.root}/probe/demo/{dataset}"

    # -- targets ------------------------------------------------------------------------------
    @property
    def inspect(self) -> str:
        """Cached layer inspections of the targets."""
        return f"{self.root}/inspect"

    def weights_record(self, model: str = MODEL) -> str:
        return f"{self.root}/inspect/{model}.weights.json"

    def trained_weights(self, model: str = MODEL) -> str:
        """Weights of a target the workflow trains itself."""
        return f"{self.root}/models/{model}.pt"

    def trained_metrics(self, model: str = MODEL) -> str:
        return f"{self.root}/models/{model}.metrics.json"

    # -- activations and chunks ---------------------------------------------------------------
    def shard(self, model: str = MODEL, shard: str = SHARD) -> str:
        return f"{self.root}/activations/{model}/shard-{shard}.h5"

    def layer_file(self, model: str = MODEL, layer: str = LAYER) -> str:
        return f"{self.root}/activations/{model}/{layer}.h5"

    def chunk(self, stage: str, model: str = MODEL, layer: str = LAYER, chunk: str = CHUNK) -> str:
        """The table a per-chunk stage (exemplars, or a method's stage) writes."""
        return f"{self.root}/{stage}/{model}/{layer}/{chunk}.parquet"

    def layer_table(self, stage: str, model: str = MODEL, layer: str = LAYER) -> str:
        """The table a per-layer stage of a method writes (one job per layer)."""
        return f"{self.root}/{stage}/{model}/{layer}.parquet"

    def chunk_files(self, stage: str) -> str:
        """A glob of every chunk table of a stage."""
        return f"{self.root}/{stage}/*/*/*.parquet"

    # -- shared stores ------------------------------------------------------------------------
    @property
    def cache(self) -> str:
        """Captions and LLM replies, shared by every job of the run."""
        return f"{self.root}/cache"

    @property
    def images(self) -> str:
        """The content-addressed store of synthesised images."""
        return f"{self.root}/images"

    # -- final outputs ------------------------------------------------------------------------
    def descriptions(self, suffix: str = "parquet") -> str:
        return f"{self.root}/descriptions.{suffix}"

    def details(self, method: str, suffix: str = "parquet") -> str:
        """A method's own per-neuron table, joined to the descriptions on (model, layer, neuron)."""
        return f"{self.root}/descriptions/{method}.{suffix}"

    def evaluation_layer(self, model: str = MODEL, layer: str = LAYER) -> str:
        """One layer's held-out evaluation rows (every method, every metric)."""
        return f"{self.root}/evaluation/{model}/{layer}.parquet"

    def evaluation_split(self) -> str:
        """The probe images with their held-out flag."""
        return f"{self.root}/evaluation/split.parquet"

    def evaluation_neurons(self) -> str:
        return f"{self.root}/evaluation/neurons.parquet"

    def evaluation_summary(self, suffix: str = "parquet") -> str:
        return f"{self.root}/evaluation/summary.{suffix}"

    def evaluation_shortcuts(self) -> str:
        """The demo targets' planted shortcuts, looked for in TExplain's per-class words."""
        return f"{self.root}/evaluation/shortcuts.csv"

    @property
    def report_index(self) -> str:
        """The static HTML report's front page (neuroscribe.report)."""
        return f"{self.root}/report/index.html"

    def report_plot(self, model: str = MODEL, layer: str = LAYER, fmt: str = "png") -> str:
        """A layer's evaluation plot in the report (the folder layout of neuroscribe.report)."""
        return f"{self.root}/report/plots/{model}/{layer}.evaluation.{fmt}"

    @property
    def plan(self) -> str:
        return f"{self.root}/plan.json"

    # -- logs and benchmarks ------------------------------------------------------------------
    @property
    def logs(self) -> str:
        return f"{self.root}/logs"

    @property
    def benchmarks(self) -> str:
        return f"{self.root}/benchmarks"

    def log(self, rule: str, *parts: str) -> str:
        """A job's log: logs/{rule}.log, or logs/{rule}/{parts...}.log for a rule with wildcards."""
        return f"{self.root}/logs/{'/'.join((rule, *parts))}.log"

    def benchmark(self, rule: str, *parts: str) -> str:
        return f"{self.root}/benchmarks/{'/'.join((rule, *parts))}.tsv"

    def chunk_log(self, rule: str) -> str:
        return self.log(rule, MODEL, LAYER, CHUNK)

    def chunk_benchmark(self, rule: str) -> str:
        return self.benchmark(rule, MODEL, LAYER, CHUNK)

    def layer_log(self, rule: str) -> str:
        return self.log(rule, MODEL, LAYER)

    def layer_benchmark(self, rule: str) -> str:
        return self.benchmark(rule, MODEL, LAYER)
