rule render_demo_probe:
    output:
        directory(PATHS.demo_folder("{dataset}")),
    log:
        PATHS.log("render_demo_probe", "{dataset}"),
    benchmark:
        PATHS.benchmark("render_demo_probe", "{dataset}")
    localrule: True
    conda:
        CPU_ENV
    params:
        args=lambda w, output: as_json(demo_args(w.dataset, output[0])),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe render-demo {params.args:q} 2> {log}'


rule train_demo_target:
    output:
        weights=PATHS.trained_weights(),
        metrics=PATHS.trained_metrics(),
    log:
        PATHS.log("train_demo_target", "{model}"),
    benchmark:
        PATHS.benchmark("train_demo_target", "{model}")
    # every other job of the target waits for its weights: start them first
    priority: 10
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
