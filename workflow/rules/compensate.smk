# Stage 4, compensated variants (prunings.compensate): the pruning {pruning} of a search method,
# materialised with a training-free correction fitted on the search's calibration set and
# folded into the kept blocks' weights (blockpruner/compensate). The directory has the pruned
# model's shapes and loads like it, so the evaluation rules read it as the variant
# {calib}/{method}/{pruning}+{comp}, and the summary puts its row beside the uncompensated one.


rule compensate_model:
    input:
        model=rules.prepare_model.output.manifest,
        calib=rules.sample_calibration.output.manifest,
        steps=pruning_steps,
    output:
        manifest="results/pruned/{model}/{calib}/{method}/{pruning}+{comp}/manifest.json",
    wildcard_constraints:
        method=methods_regex(),
        comp=compensation_regex(),
    params:
        which=pruning_option,
        options=compensation_options,
        model_dir=dirname_of("model"),
        calib_dir=dirname_of("calib"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
        code=code_hash("compensate"),
    message:
        "Compensating {wildcards.pruning} of {wildcards.method} with {wildcards.comp} ({wildcards.model} / {wildcards.calib})"
    log:
        "logs/compensate_model/{model}/{calib}/{method}/{pruning}+{comp}.log",
    benchmark:
        "logs/timing/compensate_model/{model}/{calib}/{method}/{pruning}+{comp}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("compensate_model")["threads"]
    resources:
        **job_resources("compensate_model", gpu=False),
    shell:
        "python -m blockpruner.cli compensate --model {params.model_dir:q} {params.which} --calib {params.calib_dir:q}"
        " --method {wildcards.comp} {params.options} --out {params.out_dir:q} > {log} 2>&1"
