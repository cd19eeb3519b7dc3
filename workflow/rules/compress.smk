# Stage 4, compressors: SliceGPT and LaCo rewrite the model instead of removing blocks, so a
# compress method has no search steps. Each ratio target (r0.2) is one job that compresses the
# prepared model towards that fraction of all parameters with the method's settings and writes
# the same directory as materialize_model (manifest.json beside the weights), which the
# evaluation rules read like any pruned model; the manifest's `compression` record holds the
# achieved ratio for the summary.


rule compress_model:
    input:
        model=rules.prepare_model.output.manifest,
        calib=rules.sample_calibration.output.manifest,
    output:
        manifest="results/pruned/{model}/{calib}/{method}/{pruning}/manifest.json",
    wildcard_constraints:
        method=compress_regex(),
        pruning=r"r0\.[0-9]+",
    params:
        algorithm=lookup(dpath="methods/{method}/algorithm", within=config),
        ratio=lambda wildcards: float(wildcards.pruning[1:]),
        settings=compress_settings,
        model_dir=dirname_of("model"),
        calib_dir=dirname_of("calib"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
        code=code_hash("compress"),
    message:
        "Compressing {wildcards.model} to {wildcards.pruning} with {wildcards.method} ({params.algorithm}, "
        "calibration {wildcards.calib})"
    log:
        "logs/compress_model/{model}/{calib}/{method}/{pruning}.log",
    benchmark:
        "logs/timing/compress_model/{model}/{calib}/{method}/{pruning}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("compress_model")["threads"]
    resources:
        **job_resources("compress_model"),
    shell:
        "python -m blockpruner.gpus {resources.gpu} -- python -m blockpruner.cli compress --algorithm {params.algorithm}"
        " --model {params.model_dir:q} --calib {params.calib_dir:q} --ratio {params.ratio} --settings {params.settings:q}"
        " --device auto --out {params.out_dir:q} > {log} 2>&1"
