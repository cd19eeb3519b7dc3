# Stage 1: a model source (hub id, local dir, .gguf, pypi:<package>) -> a local safetensors
# directory with manifest.json, loaded fast by every later stage.


rule prepare_model:
    output:
        manifest="results/models/{model}/manifest.json",
    params:
        source=lookup(dpath="models/{model}/source", within=config),
        dtype=lookup(dpath="models/{model}/dtype", within=config),
        trust=lambda wildcards: "--trust-remote-code" if config["models"][wildcards.model].get("trust_remote_code") else "",
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
        code=code_hash("prepare-model"),
    message:
        "Preparing model {wildcards.model} from {params.source}"
    log:
        "logs/prepare_model/{model}.log",
    benchmark:
        "logs/timing/prepare_model/{model}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("prepare_model")["threads"]
    resources:
        **job_resources("prepare_model"),
    shell:
        "python -m blockpruner.cli prepare-model {params.source:q} {params.out_dir:q} --dtype {params.dtype} {params.trust}"
        " > {log} 2>&1"
