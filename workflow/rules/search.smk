# Stage 3: the greedy search, one job and one file per step.  Step k reads step k-1, so a
# study asking for K=12 after K=8 runs only steps 9..12; `tabulate_search` lists the
# removal sequence for a person to read.


rule search_step:
    input:
        model=rules.prepare_model.output.manifest,
        calib=rules.sample_calibration.output.manifest,
        prev=previous_step,
    output:
        step="results/search/{model}/{calib}/{method}/step_{k}.json",
    params:
        algorithm=lookup(dpath="methods/{method}/algorithm", within=config),
        candidates=lookup(dpath="methods/{method}/candidates", within=config),
        device_map=option("--device-map", "models/{model}/device_map"),
        prev=lambda wildcards, input: f"--prev {shlex.quote(input.prev[0])}" if input.prev else "",
        model_dir=dirname_of("model"),
        calib_dir=dirname_of("calib"),
        command=step_command,
        code=lambda wildcards: code_hash(step_command(wildcards).split()[0]),
    log:
        "logs/search_step/{model}/{calib}/{method}/step_{k}.log",
    benchmark:
        "logs/benchmarks/search_step/{model}/{calib}/{method}/step_{k}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("search_step")["threads"]
    resources:
        gpu=gpus("search_step"),
        mem_mb=rule_resources("search_step")["mem_mb"],
        runtime=rule_resources("search_step")["runtime"],
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli {params.command} --model {params.model_dir:q} --calib {params.calib_dir:q}"
        " --k {wildcards.k} {params.prev} --candidates {params.candidates} {params.device_map}"
        " --device auto --no-progress --out {output.step:q} > {log} 2>&1"


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
