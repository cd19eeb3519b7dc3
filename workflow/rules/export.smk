# Stage 5b: GGUF files for llama.cpp (export.gguf) of the dense model and every block-removal
# variant, their speed in llama.cpp (the pruned file against the dense one in one job), and a
# model card beside each variant's files with the study's evaluation figures.

GGUF_OUTTYPES = "f32|f16|bf16|q8_0|q4_k_m"  # export-gguf --outtype (the schema's export.gguf enum)


rule export_gguf:
    input:
        model=model_manifest,
    output:
        gguf="results/gguf/{model}/{variant}/model-{outtype}.gguf",
    wildcard_constraints:
        outtype=GGUF_OUTTYPES,
    params:
        model_dir=dirname_of("model"),
        code=code_hash("export-gguf"),
    message:
        "GGUF ({wildcards.outtype}) of {wildcards.model} / {wildcards.variant} for llama.cpp"
    log:
        "logs/export_gguf/{model}/{variant}/{outtype}.log",
    benchmark:
        "logs/timing/export_gguf/{model}/{variant}/{outtype}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("export_gguf")["threads"]
    resources:
        **job_resources("export_gguf", gpu=False),
    shell:
        "python -m blockpruner.cli export-gguf {params.model_dir:q} {output.gguf:q} --outtype {wildcards.outtype}"
        " --threads {threads} > {log} 2>&1"


rule measure_speed_gguf:
    input:
        model="results/gguf/{model}/{variant}/model-{outtype}.gguf",
        baseline="results/gguf/{model}/dense/model-{outtype}.gguf",
    output:
        json="results/eval/{model}/{variant}/speed-gguf-{outtype}.json",
    wildcard_constraints:
        outtype=GGUF_OUTTYPES,
    params:
        prompt_tokens=lookup(dpath="evaluate/speed/prompt_tokens", within=config),
        new_tokens=lookup(dpath="evaluate/speed/new_tokens", within=config),
        repeats=lookup(dpath="evaluate/speed/repeats", within=config),
        warmup=lookup(dpath="evaluate/speed/warmup", within=config),
        code=code_hash("speed-gguf"),
    message:
        "llama.cpp speed of {wildcards.model} / {wildcards.variant} ({wildcards.outtype}) against the dense file"
    log:
        "logs/measure_speed_gguf/{model}/{variant}/{outtype}.log",
    benchmark:
        "logs/timing/measure_speed_gguf/{model}/{variant}/{outtype}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("measure_speed_gguf")["threads"]
    resources:
        **job_resources("measure_speed_gguf", gpu=False),
    shell:
        "python -m blockpruner.cli speed-gguf --model {input.model:q} --baseline {input.baseline:q}"
        " --prompt-tokens {params.prompt_tokens} --new-tokens {params.new_tokens} --repeats {params.repeats}"
        " --warmup {params.warmup} --threads {threads} --out {output.json:q} > {log} 2>&1"


rule write_model_card:
    input:
        model=model_manifest,
        evals=variant_evals,
        dense=dense_evals,
    output:
        card="results/gguf/{model}/{variant}/README.md",
    params:
        model_dir=dirname_of("model"),
        code=code_hash("model-card"),
    message:
        "Model card of the GGUF files of {wildcards.model} / {wildcards.variant}, with the study's figures"
    log:
        "logs/write_model_card/{model}/{variant}.log",
    benchmark:
        "logs/timing/write_model_card/{model}/{variant}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("write_model_card")["threads"]
    resources:
        **job_resources("write_model_card", gpu=False),
    shell:
        "python -m blockpruner.cli model-card {params.model_dir:q} --layout gguf --out {output.card:q}"
        " --eval {input.evals:q} --dense {input.dense:q} > {log} 2>&1"
