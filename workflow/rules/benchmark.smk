# The search-speed benchmark (benchmark.enabled, or `snakemake benchmarks`): plain greedy,
# BlockPruner's exact search and the screened mode, in one job on the same model, calibration
# set and K; a JSON with every figure and a Markdown table (blockpruner benchmark-search).


rule benchmark_search:
    input:
        model=rules.prepare_model.output.manifest,
        calib=rules.sample_calibration.output.manifest,
    output:
        json="results/benchmarks/{model}/{calib}/search_speed.json",
        md=report(
            "results/benchmarks/{model}/{calib}/search_speed.md",
            caption="../report/benchmark.rst",
            category="Benchmarks",
        ),
    params:
        model_dir=dirname_of("model"),
        calib_dir=dirname_of("calib"),
        k=lookup(dpath="benchmark/k", within=config),
        methods=lambda wildcards: ",".join(lookup(dpath="benchmark/methods", within=config)),
        screen_windows=lookup(dpath="benchmark/screen_windows", within=config),
        confirm_top=lookup(dpath="benchmark/confirm_top", within=config),
        max_windows=option("--max-windows", "benchmark/max_windows"),
        code=code_hash("benchmark-search"),
    message:
        "Search-speed benchmark ({params.methods}, K={params.k}) on {wildcards.model} / {wildcards.calib}"
    log:
        "logs/benchmark_search/{model}/{calib}.log",
    benchmark:
        "logs/timing/benchmark_search/{model}/{calib}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("benchmark_search")["threads"]
    resources:
        **job_resources("benchmark_search"),
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli benchmark-search"
        " --model {params.model_dir:q} --calib {params.calib_dir:q} --k {params.k} --methods {params.methods}"
        " --screen-windows {params.screen_windows} --confirm-top {params.confirm_top} {params.max_windows}"
        " --device auto --json {output.json:q} --md {output.md:q} > {log} 2>&1"


rule benchmarks:
    input:
        expand(rules.benchmark_search.output, model=MODELS, calib=CALIBS),
