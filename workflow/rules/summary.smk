# Stage 6: one table shaped like the paper's Table 1 (results/summary.csv / .md) and plots.


rule summarize:
    input:
        evals=eval_outputs(),
        steps=search_outputs(),
        refined=refine_outputs(),
        compressed=compress_outputs(),
    output:
        csv=report("results/summary.csv", caption="../report/summary.rst", category="Summary"),
        md="results/summary.md",
        ppl_plot=report("results/plots/ppl_vs_ratio.png", caption="../report/ppl_vs_ratio.rst", category="Plots"),
        acc_plot=report(
            "results/plots/accuracy_vs_ratio.png", caption="../report/accuracy_vs_ratio.rst", category="Plots"
        ),
        blocks_plot=report(
            "results/plots/blocks_per_step.png", caption="../report/blocks_per_step.rst", category="Plots"
        ),
    params:
        ratio_of=lookup(dpath="prunings/ratio_of", within=config),
        note=option("--note", "note"),
        code=code_hash("summarize"),
    message:
        "Summarising the study: results/summary.md, results/plots/"
    log:
        "logs/summarize.log",
    benchmark:
        "logs/timing/summarize.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("summarize")["threads"]
    resources:
        **job_resources("summarize", gpu=False),
    shell:
        "python -m blockpruner.cli summarize --csv {output.csv:q} --markdown {output.md:q} --ratio-of {params.ratio_of}"
        " --plot-ppl {output.ppl_plot:q} --plot-accuracy {output.acc_plot:q} --plot-blocks {output.blocks_plot:q}"
        " {params.note}"
        " {input.evals:q} {input.steps:q} {input.refined:q} {input.compressed:q} > {log} 2>&1"
