rule describe:
    input:
        **describe_inputs(),
    output:
        parquet=f"{RESULTS}/descriptions.parquet",
        csv=f"{RESULTS}/descriptions.csv",
    log:
        f"{RESULTS}/logs/describe.log",
    benchmark:
        f"{RESULTS}/benchmarks/describe.tsv"
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
                "captions": list(input.get("captions", [])),
                "concepts": list(input.get("concepts", [])),
                "synthesis": list(input.get("synthesis", [])),
                "scores": list(input.get("scores", [])),
                "models": model_ids(),
                "methods": config["methods"],
                "parquet": output.parquet,
                "csv": output.csv,
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe describe {params.args:q} 2> {log}'


# No declared output, so `snakemake plan` always prints the summary; it still writes plan.json.
rule plan:
    log:
        f"{RESULTS}/logs/plan.log",
    localrule: True
    conda:
        CPU_ENV
    params:
        # a function: the executor and profile are known only once the DAG is built
        args=lambda w: as_json(
            {
                "plan": build_plan(LAYOUT, config),
                "out": f"{RESULTS}/plan.json",
                "images_per_concept": config["synthesizer"]["images_per_concept"],
                "resources": config["resources"],
                "cluster": cluster_view(),
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe plan {params.args:q} 2> {log}'
