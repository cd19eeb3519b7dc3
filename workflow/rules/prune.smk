# Stage 4: write the pruned model of each requested pruning as a transformers directory.
#
# A K target (k3) reads step_3.json.  A ratio target (r0.2) cannot know its K before the
# search has run, so it reads steps 1..search.max_k and resolves K inside the job with
# `blockpruner target-k` (the smallest K whose ratio reaches the target; the step sequence
# is a prefix, so that K does not depend on how far the search went).  No checkpoint is
# needed and dry runs show the whole plan.  A K beyond search.max_k (only possible from
# stale step files of an earlier, deeper study) is refused.


rule materialize_model:
    input:
        model=rules.prepare_model.output.manifest,
        steps=pruning_steps,
    output:
        manifest="results/pruned/{model}/{calib}/{method}/{pruning}/manifest.json",
    params:
        # what decides the result (the target itself is the {pruning} wildcard)
        ratio_of=lambda wildcards: config["prunings"]["ratio_of"] if is_ratio(wildcards) else None,
        code=lambda wildcards: code_hash("materialize", "target-k") if is_ratio(wildcards) else code_hash("materialize"),
        # derived from the inputs
        resolve_k=resolve_k,
        max_k=lambda wildcards, input: len(input.steps) if is_ratio(wildcards) else int(wildcards.pruning[1:]),
        steps_dir=lambda wildcards, input: os.path.dirname(input.steps[0]),
        model_dir=dirname_of("model"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
    log:
        "logs/materialize_model/{model}/{calib}/{method}/{pruning}.log",
    benchmark:
        "logs/benchmarks/materialize_model/{model}/{calib}/{method}/{pruning}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("materialize_model")["threads"]
    resources:
        gpu=gpus("materialize_model"),
        mem_mb=rule_resources("materialize_model")["mem_mb"],
        runtime=rule_resources("materialize_model")["runtime"],
    shell:
        """
        exec > {log:q} 2>&1
        K=$({params.resolve_k})
        echo "{wildcards.pruning}: K=$K"
        if [ "$K" -gt {params.max_k} ]; then
            echo "error: {wildcards.pruning} needs K=$K > search.max_k={params.max_k}; raise search.max_k" >&2
            exit 1
        fi
        python -m blockpruner.cli materialize --model {params.model_dir:q} --step {params.steps_dir:q}/step_$K.json --out {params.out_dir:q}
        """
