# Stage 3: the greedy search, one job and one file per step.  Step k reads step k-1, so a
# study asking for K=12 after K=8 runs only steps 9..12.  With search.shards > 1 an exact
# BlockPruner step is scored as N search_shard jobs (every N-th candidate in the tie order,
# one GPU each) and gather_step writes the step from them; otherwise search_step scores the
# step in one job.  tabulate_search lists the removal sequence for a person to read.
# A step job killed or stopped (SIGTERM: exit status 75) leaves its journal beside its output;
# the retries (search.retries) and any later run resume from it (their log says so).


rule search_step:
    input:
        model=rules.prepare_model.output.manifest,
        calib=rules.sample_calibration.output.manifest,
        prev=previous_step,
    output:
        step="results/search/{model}/{calib}/{method}/step_{k}.json",
    wildcard_constraints:
        method=methods_regex(sharded=False),
    params:
        arguments=step_arguments,
        code=lambda wildcards: code_hash(step_command(wildcards).split()[0]),
    message:
        "Search step {wildcards.k} of {wildcards.method} on {wildcards.model} / {wildcards.calib}"
    log:
        "logs/search_step/{model}/{calib}/{method}/step_{k}.log",
    benchmark:
        "logs/timing/search_step/{model}/{calib}/{method}/step_{k}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("search_step")["threads"]
    resources:
        **job_resources("search_step"),
    retries: config["search"]["retries"]
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli {params.arguments}"
        " --out {output.step:q} > {log} 2>&1"


rule search_shard:
    input:
        model=rules.prepare_model.output.manifest,
        calib=rules.sample_calibration.output.manifest,
        prev=previous_step,
    output:
        shard="results/search/{model}/{calib}/{method}/shards/step_{k}.shard{shard}of{nshards}.json",
    wildcard_constraints:
        method=methods_regex(sharded=True),
    params:
        arguments=step_arguments,
        code=code_hash("step"),
    message:
        "Search step {wildcards.k} of {wildcards.method} on {wildcards.model} / {wildcards.calib}: "
        "shard {wildcards.shard} of {wildcards.nshards}"
    log:
        "logs/search_shard/{model}/{calib}/{method}/step_{k}.shard{shard}of{nshards}.log",
    benchmark:
        "logs/timing/search_shard/{model}/{calib}/{method}/step_{k}.shard{shard}of{nshards}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("search_step")["threads"]
    resources:
        **job_resources("search_step"),
    retries: config["search"]["retries"]
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli {params.arguments}"
        " --shard {wildcards.shard}/{wildcards.nshards} --out {output.shard:q} > {log} 2>&1"


rule gather_step:
    input:
        shards=shard_paths,
    output:
        step="results/search/{model}/{calib}/{method}/step_{k}.json",
    wildcard_constraints:
        method=methods_regex(sharded=True),
    params:
        code=code_hash("gather-step"),
    message:
        "Search step {wildcards.k} of {wildcards.method} on {wildcards.model} / {wildcards.calib}: gathering "
        "{input.shards:q}"
    log:
        "logs/gather_step/{model}/{calib}/{method}/step_{k}.log",
    benchmark:
        "logs/timing/gather_step/{model}/{calib}/{method}/step_{k}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("search_step")["threads"]
    resources:
        **job_resources("search_step", gpu=False),
    shell:
        "python -m blockpruner.cli gather-step --shards {input.shards:q} --out {output.step:q} > {log} 2>&1"


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
    message:
        "Tabulating the removal sequence of {wildcards.method} on {wildcards.model} / {wildcards.calib}"
    log:
        "logs/tabulate_search/{model}/{calib}/{method}.log",
    benchmark:
        "logs/timing/tabulate_search/{model}/{calib}/{method}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("tabulate_search")["threads"]
    resources:
        **job_resources("tabulate_search", gpu=False),
    shell:
        "python -m blockpruner.cli sequence --out {output.csv:q} {input.steps:q} > {log} 2>&1"
