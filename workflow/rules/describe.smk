rule describe:
    input:
        exemplars=chunk_outputs("exemplars"),
        methods=method_outputs(),
    output:
        parquet=PATHS.descriptions(),
        csv=report(
            PATHS.descriptions("csv"),
            caption="../report/descriptions.rst",
            category="Descriptions",
        ),
        details=[f for files in details_outputs().values() for f in files.values()],
    log:
        PATHS.log("describe"),
    benchmark:
        PATHS.benchmark("describe")
    conda:
        CPU_ENV
    threads: stage_resource("describe", "cpus")
    resources:
        mem_mb=scaled("describe", "mem_mb"),
        runtime=scaled("describe", "runtime"),
    params:
        args=lambda w, input, output: as_json(
            {
                "exemplars": list(input.exemplars),
                "stage_files": stage_files(),
                "models": model_ids(),
                "methods": config["methods"],
                "parquet": output.parquet,
                "csv": output.csv,
                "details": details_outputs(),
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe describe {params.args:q} 2> {log}'


# No declared output, so `snakemake plan` always prints the summary; it still writes plan.json.
rule plan:
    log:
        PATHS.log("plan"),
    localrule: True
    conda:
        CPU_ENV
    params:
        # a function: the executor and profile are known only once the DAG is built
        args=lambda w: as_json(
            {
                "plan": build_plan(LAYOUT, config),
                "out": PATHS.plan,
                "resources": config["resources"],
                "cluster": cluster_view(),
                "gpus": rule_gpus(config),
                "calibration": config["plan"]["calibration"],
                "steps": dnd_steps(),
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe plan {params.args:q} 2> {log}'
