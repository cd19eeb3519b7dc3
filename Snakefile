# BlockPruner study workflow: prepare models, sample calibration data, search the greedy
# block-removal sequence step by step, materialise the requested prunings, evaluate them
# (WikiText-2 perplexity, zero-shot tasks, speed) and summarise as the paper's Table 1.
#
#   snakemake --cores 2                                # the demo study (config.yaml)
#   snakemake --cores 2 --configfile .test/config.yaml # the CI study (replaces config.yaml)
#   snakemake --profile profiles/slurm --configfile config/paper.yaml
#
# Stages, one file each in workflow/rules/: model -> calibration -> search [-> refine] -> prune
# -> evaluate -> summary, and export (GGUF files for llama.cpp); methods that compress instead of
# searching (SliceGPT, LaCo) go from calibration to compress.smk and on to evaluate.  Every rule
# calls one `blockpruner` subcommand.

from snakemake.utils import min_version

min_version("9.0")


# A --configfile given on the command line replaces the demo study instead of being merged
# into it (models, calibration sets and methods are maps: merging would mix two studies).
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/code.smk"
include: "workflow/rules/inputs.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/calibration.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/refine.smk"
include: "workflow/rules/prune.smk"
include: "workflow/rules/compensate.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/analyses.smk"
include: "workflow/rules/benchmark.smk"


localrules:
    all,
    tabulate_search,
    summarize,
    analyze_study,
    analyses,
    benchmarks,


rule all:
    default_target: True
    input:
        rules.summarize.output,
        sequence_outputs(),
        rules.analyses.input if config["analyses"]["enabled"] else [],
        rules.benchmarks.input if config["benchmark"]["enabled"] else [],
        gguf_outputs(),
