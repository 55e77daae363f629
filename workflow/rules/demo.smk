rule render_demo_probe:
    output:
        directory(f"{RESULTS}/probe/demo/{{dataset}}"),
    log:
        f"{RESULTS}/logs/render_demo_probe/{{dataset}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/render_demo_probe/{{dataset}}.tsv"
    localrule: True
    conda:
        CPU_ENV
    params:
        args=lambda w, output: as_json(demo_args(w.dataset, output[0])),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe render-demo {params.args:q} 2> {log}'


rule train_demo_target:
    output:
        weights=f"{RESULTS}/models/{{model}}.pt",
        metrics=f"{RESULTS}/models/{{model}}.metrics.json",
    log:
        f"{RESULTS}/logs/train_demo_target/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train_demo_target/{{model}}.tsv"
    conda:
        GPU_ENV
    threads: stage_resource("train", "cpus")
    resources:
        mem_mb=scaled("train", "mem_mb"),
        runtime=scaled("train", "runtime"),
    params:
        args=lambda w, output: as_json(train_args(w.model, output)),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe train {params.args:q} 2> {log}'


rule evaluate_demo:
    input:
        descriptions=f"{RESULTS}/descriptions.parquet",
        manifest=f"{RESULTS}/probe/manifest.parquet",
        layers=[f for m in trained_models() for f in layer_files(m).values()],
    output:
        f"{RESULTS}/evaluation.parquet",
    log:
        f"{RESULTS}/logs/evaluate_demo.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate_demo.tsv"
    localrule: True
    conda:
        CPU_ENV
    params:
        args=lambda w, input, output: as_json(evaluate_args(input, output)),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe evaluate {params.args:q} 2> {log}'
