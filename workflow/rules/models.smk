from neuroscribe.prefetch import models_to_fetch


# Reads the weights file safely (tensors only) and checks its names and shapes against the
# model built on the meta device; cheap, so it runs where snakemake runs, before any GPU job.
rule check_weights:
    input:
        weights=weights_file_of,
    output:
        PATHS.weights_record(),
    log:
        PATHS.log("check_weights", "{model}"),
    localrule: True
    conda:
        CPU_ENV
    params:
        args=lambda w, input, output: as_json(
            {
                "target": target_dict(w.model),
                "path": input.weights[0],
                "out": output[0],
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe check-weights {params.args:q} 2> {log}'


# `snakemake prefetch` on the login node downloads every model the config names into HF_HOME /
# TORCH_HOME, for compute nodes without internet. No declared output, so it always runs.
rule prefetch:
    log:
        PATHS.log("prefetch"),
    localrule: True
    conda:
        CPU_ENV
    params:
        args=lambda w: as_json(
            {
                "refs": [
                    m.to_dict()
                    for m in models_to_fetch(config, LAYOUT.targets.values())
                ]
            }
        ),
    shell:
        '"${{NEUROSCRIBE_PYTHON:-python}}" -m neuroscribe prefetch {params.args:q} 2> {log}'
