# Stage 5: evaluate every model variant -- `dense` (the prepared model) and each pruned
# copy {calib}/{method}/{pruning} -- on WikiText-2 perplexity, zero-shot tasks and
# generation speed.  One JSON per variant and measurement under results/eval/{model}/.


rule eval_perplexity:
    input:
        model=model_manifest,
        data=perplexity_file,
    output:
        json="results/eval/{model}/{variant}/ppl.json",
    params:
        data=perplexity_data(),
        hub_config=perplexity_hub_config(),
        seqlen=lookup(dpath="evaluate/perplexity/seqlen", within=config),
        max_windows=option("--max-windows", "evaluate/perplexity/max_windows"),
        numerics=config["numerics"],
        model_dir=dirname_of("model"),
        code=code_hash("eval-ppl"),
    message:
        "WikiText-2 perplexity of {wildcards.model} / {wildcards.variant}"
    log:
        "logs/eval_perplexity/{model}/{variant}.log",
    benchmark:
        "logs/timing/eval_perplexity/{model}/{variant}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("eval_perplexity")["threads"]
    resources:
        **job_resources("eval_perplexity"),
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli eval-ppl --model {params.model_dir:q} --data {params.data:q}"
        " {params.hub_config} --seqlen {params.seqlen} {params.max_windows}"
        " --numerics {params.numerics} --device auto --out {output.json:q} > {log} 2>&1"


rule eval_tasks:
    input:
        model=model_manifest,
    output:
        json="results/eval/{model}/{variant}/tasks.json",
    params:
        tasks=",".join(TASK_NAMES),
        local_data=tasks_local_data(),
        num_fewshot=lookup(dpath="evaluate/tasks/num_fewshot", within=config),
        batch_size=lookup(dpath="evaluate/tasks/batch_size", within=config),
        add_bos_token=tasks_bos(),
        numerics=config["numerics"],
        limit=option("--limit", "evaluate/tasks/limit"),
        model_dir=dirname_of("model"),
        code=code_hash("eval-tasks"),
    message:
        "Zero-shot tasks {params.tasks} on {wildcards.model} / {wildcards.variant}"
    log:
        "logs/eval_tasks/{model}/{variant}.log",
    benchmark:
        "logs/timing/eval_tasks/{model}/{variant}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("eval_tasks")["threads"]
    resources:
        **job_resources("eval_tasks"),
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli eval-tasks --model {params.model_dir:q} --tasks {params.tasks}"
        " {params.local_data} --num-fewshot {params.num_fewshot} --batch-size {params.batch_size} {params.limit}"
        " --add-bos-token {params.add_bos_token} --numerics {params.numerics}"
        " --device auto --out {output.json:q} > {log} 2>&1"


rule measure_speed:
    input:
        model=model_manifest,
        baseline=dense_model,
    output:
        json="results/eval/{model}/{variant}/speed.json",
    params:
        prompt_tokens=lookup(dpath="evaluate/speed/prompt_tokens", within=config),
        new_tokens=lookup(dpath="evaluate/speed/new_tokens", within=config),
        repeats=lookup(dpath="evaluate/speed/repeats", within=config),
        warmup=lookup(dpath="evaluate/speed/warmup", within=config),
        model_dir=dirname_of("model"),
        baseline=lambda wildcards, input: f"--baseline {shlex.quote(os.path.dirname(input.baseline[0]))}" if input.baseline else "",
        code=code_hash("speed"),
    message:
        "Generation speed of {wildcards.model} / {wildcards.variant}"
    log:
        "logs/measure_speed/{model}/{variant}.log",
    benchmark:
        "logs/timing/measure_speed/{model}/{variant}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("measure_speed")["threads"]
    resources:
        **job_resources("measure_speed"),
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli speed --model {params.model_dir:q} {params.baseline}"
        " --prompt-tokens {params.prompt_tokens} --new-tokens {params.new_tokens} --repeats {params.repeats}"
        " --warmup {params.warmup} --threads {threads} --device auto --out {output.json:q}"
        " > {log} 2>&1"
