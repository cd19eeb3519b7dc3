# Stage 7: the paper's analyses, each a CSV and a PNG under results/analyses/.
#   analyze_study (one job per analysis):
#     ratio      accuracy / perplexity vs pruning ratio per method (Figures 4, 6, 10)
#     attention  attention share among removed blocks (Figure 5)
#     time       pruning time (Table 7)
#     calibration  effect of the calibration set and its sample count (Figure 7)
#   time and calibration compare searches at analyses.budget_ratio (Table 1's rule: each
#   search's smallest K removing at least that share).
#   analyze_bi:  Block Influence at layer vs block level on the dense model (Figure 1)
# Built by `snakemake analyses` (or as part of `all` when `analyses.enabled` is true).

ANALYSES = ["ratio", "attention", "time", "calibration"]


rule analyze_study:
    input:
        evals=eval_outputs(),
        steps=search_outputs(),
        compressed=compress_outputs(),
    output:
        csv="results/analyses/{analysis}.csv",
        png=report("results/analyses/{analysis}.png", caption="../report/analyses.rst", category="Analyses"),
    wildcard_constraints:
        analysis="|".join(ANALYSES),
    params:
        ratio_of=lookup(dpath="prunings/ratio_of", within=config),
        budget=analysis_budget,
        code=lambda wildcards: code_hash(f"analyze-{wildcards.analysis}"),
    message:
        "Analysis '{wildcards.analysis}' of the study -> {output.csv}"
    log:
        "logs/analyze_study/{analysis}.log",
    benchmark:
        "logs/timing/analyze_study/{analysis}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("analyze_study")["threads"]
    resources:
        **job_resources("analyze_study", gpu=False),
    shell:
        "python -m blockpruner.cli analyze-{wildcards.analysis} --ratio-of {params.ratio_of} {params.budget}"
        " --csv {output.csv:q} --png {output.png:q} {input.evals:q} {input.steps:q} {input.compressed:q} > {log} 2>&1"


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
    message:
        "Block Influence of layers and blocks of {wildcards.model} on {wildcards.calib}"
    log:
        "logs/analyze_bi/{model}/{calib}.log",
    benchmark:
        "logs/timing/analyze_bi/{model}/{calib}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("analyze_bi")["threads"]
    resources:
        **job_resources("analyze_bi"),
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli analyze-bi --model {params.model_dir:q}"
        " --calib {params.calib_dir:q} {params.max_windows} --device auto --csv {output.csv:q} --png {output.png:q} > {log} 2>&1"


rule analyses:
    input:
        expand(rules.analyze_study.output, analysis=ANALYSES),
        expand(rules.analyze_bi.output, model=MODELS, calib=CALIBS),
