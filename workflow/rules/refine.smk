# Stage 3b: refinements (methods.<name>.refine: swap | evolution) of another search's set.
# Each pruning of the refinement (k{K}, or r{ratio}: the K the refined search reaches it at)
# starts from that search's set at K and writes the refined set as a step record of K, which
# materialize_model reads as it reads a step.  Each K is refined on its own: a refined set is
# not a prefix of the next K's.  The rounds are kept in <output>.rounds/ (not an output, so
# Snakemake keeps them): a job killed, stopped (SIGTERM, exit status 75) or rerun with a
# higher round limit continues after the last round written.  Its jobs take search_step's
# resources (they score candidates as a search step does).


rule refine_set:
    input:
        model=rules.prepare_model.output.manifest,
        calib=rules.sample_calibration.output.manifest,
        steps=refine_start,
    output:
        step="results/refine/{model}/{calib}/{method}/{pruning}.json",
    wildcard_constraints:
        method=refine_regex(),
    params:
        start=refine_start_option,
        arguments=refine_arguments,
        model_dir=dirname_of("model"),
        calib_dir=dirname_of("calib"),
        code=code_hash("refine"),
    message:
        "Refining {wildcards.pruning} of {wildcards.method} ({wildcards.model} / {wildcards.calib})"
    log:
        "logs/refine_set/{model}/{calib}/{method}/{pruning}.log",
    benchmark:
        "logs/timing/refine_set/{model}/{calib}/{method}/{pruning}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("search_step")["threads"]
    resources:
        **job_resources("search_step"),
    retries: config["search"]["retries"]
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli refine --model {params.model_dir:q}"
        " --calib {params.calib_dir:q} {params.start} {params.arguments} --out {output.step:q} > {log} 2>&1"
