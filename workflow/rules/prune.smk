# Stage 4: write the pruned model of each requested pruning as a transformers directory.
#
# A K target (k3) reads step_3.json.  A ratio target (r0.2) cannot know its K before the
# search has run, so it reads steps 1..search.max_k and `materialize --steps ... --ratio`
# picks the smallest K whose ratio reaches the target (the step sequence is a prefix, so that
# K does not depend on how far the search went).  No checkpoint is needed and dry runs show
# the whole plan.


rule materialize_model:
    input:
        model=rules.prepare_model.output.manifest,
        steps=pruning_steps,
    output:
        manifest="results/pruned/{model}/{calib}/{method}/{pruning}/manifest.json",
    wildcard_constraints:
        method=methods_regex(),
    params:
        which=pruning_option,
        model_dir=dirname_of("model"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
        code=code_hash("materialize"),
    message:
        "Materialising {wildcards.pruning} of {wildcards.method} ({wildcards.model} / {wildcards.calib})"
    log:
        "logs/materialize_model/{model}/{calib}/{method}/{pruning}.log",
    benchmark:
        "logs/timing/materialize_model/{model}/{calib}/{method}/{pruning}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("materialize_model")["threads"]
    resources:
        **job_resources("materialize_model"),
    shell:
        "python -m blockpruner.cli materialize --model {params.model_dir:q} {params.which} --out {params.out_dir:q} > {log} 2>&1"
