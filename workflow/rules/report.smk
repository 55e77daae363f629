# The static HTML report (neuroscribe.report): the last job of a run, on CPU. It reads the
# final table, every method's details and stage files, the evaluation and the benchmark
# files, and writes results/{run}/report/ (index.html last). Thumbnails under report/thumbs/
# are not declared outputs, so Snakemake keeps them and a rebuild reuses them.

from neuroscribe.report.figures import config_summary, plan_figures

# Snakemake's `report()` flag; a line may not start with `report(` (read as the `report:`
# directive)
flagged = report


def report_plots(fmt):
    """A plot per evaluated layer, flagged for `snakemake --report`."""
    if not config["evaluation"]["enabled"]:
        return []
    caption = "../report/evaluation_plot.rst"
    plots = [
        (PATHS.report_plot(m, layer, fmt), {"model": m, "layer": layer, "format": fmt})
        for m, layer in evaluated_layers()
    ]
    return [
        flagged(p, caption=caption, category="Evaluation", labels=l) for p, l in plots
    ]


def report_outputs():
    """The report, when `report.enabled` (the default)."""
    return [PATHS.report_index] if config["report"]["enabled"] else []


def report_evaluation(wildcards=None):
    if not config["evaluation"]["enabled"]:
        return {}
    return {
        "neurons": PATHS.evaluation_neurons(),
        "summary": PATHS.evaluation_summary(),
    }


def report_settings():
    """The config's part in the report: its summary, the report settings, the plan's figures
    and the GPUs each rule asks for."""
    return {
        "summary": config_summary(config),
        "settings": config["report"],
        "plan": plan_figures(build_plan(LAYOUT, config)),
        "gpus": rule_gpus(config),
    }


rule report:
    input:
        unpack(report_evaluation),
        descriptions=PATHS.descriptions(),
        details=[f["parquet"] for f in details_outputs().values()],
        manifest=PATHS.manifest,
        layers=[PATHS.layer_file(m, layer) for m, layer in evaluated_layers()],
        methods=method_outputs(),
    output:
        index=PATHS.report_index,
        png=report_plots("png"),
        svg=report_plots("svg"),
    log:
        PATHS.log("report"),
    benchmark:
        PATHS.benchmark("report")
    conda:
        CPU_ENV
    threads: stage_resource("report", "cpus")
    resources:
        mem_mb=scaled("report", "mem_mb"),
        runtime=scaled("report", "runtime"),
    params:
        # what changes the pages besides the inputs (Snakemake compares it between runs)
        settings=lambda w: as_json(report_settings()),
        args=lambda w, input, output: as_json(
            {
                "descriptions": input.descriptions,
                "details": {m: f["parquet"] for m, f in details_outputs().items()},
                "manifest": input.manifest,
                "layer_files": [
                    [m, layer, PATHS.layer_file(m, layer)]
                    for m, layer in evaluated_layers()
                ],
                "stage_files": stage_files(),
                "evaluation": report_evaluation() or None,
                **report_settings(),
                "benchmarks": PATHS.benchmarks,
                "images": PATHS.images,
                "out": output.index,
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe report {params.args:q} 2> {log}'
