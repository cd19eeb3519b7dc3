# Stage 7: the paper's analyses, each a CSV and a PNG under results/analyses/.
#   analyze_study:  accuracy / perplexity vs pruning ratio per method (Figures 4, 6, 10),
#                   attention share among removed blocks (Figure 5), pruning time (Table 7)
#   analyze_bi:     Block Influence at layer vs block level on the dense model (Figure 1)
# Built by `snakemake analyses` (or as part of `all` when `analyses.enabled` is true).

ANALYSES = ["ratio", "attention", "time"]


rule analyze_study:
    input:
        evals=eval_outputs(),
        steps=search_outputs(),
    output:
        csv=expand("results/analyses/{kind}.csv", kind=ANALYSES),
        png=[
            report(f"results/analyses/{kind}.png", caption="../report/analyses.rst", category="Analyses")
            for kind in ANALYSES
        ],
    params:
        kinds=" ".join(ANALYSES),
        ratio_of=lookup(dpath="prunings/ratio_of", within=config),
        code=code_hash("analyze-ratio", "analyze-attention", "analyze-time"),
    log:
        "logs/analyze_study.log",
    benchmark:
        "logs/benchmarks/analyze_study.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("analyze_study")["threads"]
    resources:
        gpu=0,
        mem_mb=rule_resources("analyze_study")["mem_mb"],
        runtime=rule_resources("analyze_study")["runtime"],
    shell:
        "(for kind in {params.kinds}; do"
        " python -m blockpruner.cli analyze-$kind --ratio-of {params.ratio_of}"
        " --csv results/analyses/$kind.csv --png results/analyses/$kind.png {input.evals:q} {input.steps:q};"
        " done) > {log} 2>&1"


rule analyze_bi:
    input:
        model=rules.prepare_model.output.manifest,
        calib=rules.sample_calibration.output.manifest,
    output:
        csv="results/analyses/{model}/{calib}/bi_layer_vs_block.csv",
        png=report(
            "results/analyses/{model}/{calib}/bi_layer_vs_block.png",
            caption="../report/analyses.rst",
            category="Analyses",
        ),
    params:
        model_dir=dirname_of("model"),
        calib_dir=dirname_of("calib"),
        max_windows=option("--max-windows", "analyses/bi_max_windows"),
        code=code_hash("analyze-bi"),
    log:
        "logs/analyze_bi/{model}/{calib}.log",
    benchmark:
        "logs/benchmarks/analyze_bi/{model}/{calib}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("analyze_bi")["threads"]
    resources:
        gpu=gpus("analyze_bi"),
        mem_mb=rule_resources("analyze_bi")["mem_mb"],
        runtime=rule_resources("analyze_bi")["runtime"],
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli analyze-bi --model {params.model_dir:q}"
        " --calib {params.calib_dir:q} {params.max_windows} --device auto --csv {output.csv:q} --png {output.png:q} > {log} 2>&1"


rule analyses:
    input:
        rules.analyze_study.output,
        expand(rules.analyze_bi.output, model=MODELS, calib=CALIBS),
