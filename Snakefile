# neuroscribe: describe every neuron of the chosen layers of a vision model.
# Run `snakemake --profile profiles/local --configfile config/demo.yaml` (see README.md).
# Rules live in workflow/rules/; only the default target is here, because Snakemake takes the
# default target from the main Snakefile, never from an included file.


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/probe.smk"
include: "workflow/rules/activations.smk"
include: "workflow/rules/exemplars.smk"


# each enabled method's own rules (neuroscribe.methods: workflow/rules/dnd.smk for dnd)
for _rules in method_rules():

    include: _rules


include: "workflow/rules/describe.smk"
include: "workflow/rules/evaluation.smk"
include: "workflow/rules/report.smk"


# The intermediate outputs are listed too, so a deleted activation file or chunk is rebuilt on
# the next run (Snakemake does not regenerate a missing intermediate file of an up-to-date target).
rule all:
    input:
        PATHS.descriptions(),
        PATHS.descriptions("csv"),
        activation_outputs(),
        chunk_outputs("exemplars"),
        method_outputs(),
        evaluation_outputs(),
        report_outputs(),
    localrule: True


onsuccess:
    report_failures()
