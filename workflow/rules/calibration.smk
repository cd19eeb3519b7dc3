# Stage 2: sample calibration texts reproducibly and tokenise them into windows, once per
# model (its tokenizer) and calibration set.


rule sample_calibration:
    input:
        model=rules.prepare_model.output.manifest,
        data=calibration_file,
    output:
        manifest="results/calib/{model}/{calib}/manifest.json",
    params:
        data=calibration_data,
        hub_config=option("--hub-config", "calibration/{calib}/hub_config"),
        split=lookup(dpath="calibration/{calib}/split", within=config),
        text_field=lookup(dpath="calibration/{calib}/text_field", within=config),
        nsamples=lookup(dpath="calibration/{calib}/nsamples", within=config),
        seed=lookup(dpath="calibration/{calib}/seed", within=config),
        seqlen=lookup(dpath="calibration/{calib}/seqlen", within=config),
        mode=lookup(dpath="calibration/{calib}/mode", within=config),
        sampling=lookup(dpath="calibration/{calib}/sampling", within=config),
        max_windows=option("--max-windows", "calibration/{calib}/max_windows"),
        model_dir=dirname_of("model"),
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
        code=code_hash("sample-calibration"),
    message:
        "Sampling calibration set {wildcards.calib} ({params.nsamples} samples, {params.seqlen}-token windows) "
        "for {wildcards.model}"
    log:
        "logs/sample_calibration/{model}/{calib}.log",
    benchmark:
        "logs/timing/sample_calibration/{model}/{calib}.tsv"
    conda:
        CONDA_ENV
    threads: rule_resources("sample_calibration")["threads"]
    resources:
        **job_resources("sample_calibration"),
    shell:
        "python -m blockpruner.cli sample-calibration --model {params.model_dir:q} --data {params.data:q} {params.hub_config}"
        " --split {params.split:q} --text-field {params.text_field:q} --nsamples {params.nsamples}"
        " --seed {params.seed} --seqlen {params.seqlen} --mode {params.mode} --sampling {params.sampling} {params.max_windows} --out {params.out_dir:q}"
        " > {log} 2>&1"
