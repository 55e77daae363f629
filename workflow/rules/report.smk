# The static HTML report (neuroscribe.report): the last job of a run, on CPU. It reads the
# final table, every method's details and stage files, the evaluation and the benchmark
# files, and writes results/{run}/report/ (index.html last). Thumbnails under report/thumbs/
# are not declared outputs, so Snakemake keeps them and a rebuild reuses them.


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
