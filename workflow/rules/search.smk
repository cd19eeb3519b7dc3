# Stage 3: the greedy search, one job and one file per step (with search.shards > 1, one
# job per shard of the candidates plus a gathering job).  Step k reads step k-1, so a
# study asking for K=12 after K=8 runs only steps 9..12; `tabulate_search` lists the
# removal sequence for a person to read.


rule search_shard:
    # One shard of an exact BlockPruner step (search.shards > 1): every N-th candidate in
    # the tie order, as its own (GPU) job; search_step gathers the shards.
    input:
        model=rules.prepare_model.output.manifest,
        calib=rules.sample_calibration.output.manifest,
        prev=previous_step,
    output:
        shard="results/search/{model}/{calib}/{method}/shards/step_{k}.shard{shard}of{nshards}.json",
    params:
        command=score_command,
        code=code_hash("step"),
    log:
        "logs/search_shard/{model}/{calib}/{method}/step_{k}.shard{shard}of{nshards}.log",
    benchmark:
        "logs/benchmarks/search_shard/{model}/{calib}/{method}/step_{k}.shard{shard}of{nshards}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("search_step")["threads"]
    resources:
        gpu=gpus("search_step"),
        mem_mb=rule_resources("search_step")["mem_mb"],
        runtime=rule_resources("search_step")["runtime"],
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli {params.command}"
        " --shard {wildcards.shard}/{wildcards.nshards} --out {output.shard:q} > {log} 2>&1"


rule search_step:
    # Step k: scores every candidate itself, or (search.shards > 1) gathers the shards'
    # scores into the same artifact an unsharded step writes.
    input:
        model=rules.prepare_model.output.manifest,
        calib=rules.sample_calibration.output.manifest,
        prev=previous_step,
        shards=step_shards,
    output:
        step="results/search/{model}/{calib}/{method}/step_{k}.json",
    params:
        algorithm=lookup(dpath="methods/{method}/algorithm", within=config),
        candidates=lookup(dpath="methods/{method}/candidates", within=config),
        command=step_job,
        code=lambda wildcards: code_hash(step_command(wildcards).split()[0], "gather-step"),
    log:
        "logs/search_step/{model}/{calib}/{method}/step_{k}.log",
    benchmark:
        "logs/benchmarks/search_step/{model}/{calib}/{method}/step_{k}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("search_step")["threads"]
    resources:
        gpu=step_gpus,
        mem_mb=rule_resources("search_step")["mem_mb"],
        runtime=rule_resources("search_step")["runtime"],
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli {params.command}"
        " --out {output.step:q} > {log} 2>&1"


rule tabulate_search:
    input:
        steps=lambda wildcards: steps_upto(wildcards, search_depth()),
    output:
        csv=report(
            "results/search/{model}/{calib}/{method}/sequence.csv",
            caption="../report/sequence.rst",
            category="Search",
            subcategory="{model} / {calib} / {method}",
        ),
    params:
        code=code_hash("sequence"),
    log:
        "logs/tabulate_search/{model}/{calib}/{method}.log",
    benchmark:
        "logs/benchmarks/tabulate_search/{model}/{calib}/{method}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("tabulate_search")["threads"]
    resources:
        gpu=0,
        mem_mb=rule_resources("tabulate_search")["mem_mb"],
        runtime=rule_resources("tabulate_search")["runtime"],
    shell:
        "python -m blockpruner.cli sequence --out {output.csv:q} {input.steps:q} > {log} 2>&1"
