# Input and params functions of the rules, by stage file: what a rule reads and the options it
# passes, from the config and the wildcards.  (Kept out of the rule files, which hold rules only.)


# ------------------------------------------------------------------ calibration.smk


def calibration_data(wildcards):
    """The calibration source: the local copy when `path` is set, else the hub id."""
    c = config["calibration"][wildcards.calib]
    return data_path(c["path"]) if c.get("path") else c["hub"]


def calibration_file(wildcards):
    """The local calibration file as an input (so that replacing it reruns sampling), or none."""
    c = config["calibration"][wildcards.calib]
    return [data_path(c["path"])] if c.get("path") else []


# ------------------------------------------------------------------ search.smk


def is_sharded(method):
    return config["methods"][method]["algorithm"] == "blockpruner" and config["search"]["shards"] > 1


def methods_regex(sharded):
    names = [m for m in METHODS if is_sharded(m) == sharded]
    return "|".join(map(re.escape, names)) if names else NEVER


def previous_step(wildcards):
    k = int(wildcards.k)
    return [step_path(wildcards.model, wildcards.calib, wildcards.method, k - 1)] if k > 1 else []


def step_command(wildcards):
    """The subcommand scoring one step: `step` for BlockPruner (with the screened mode's
    options when the method asks for it), `baseline-step` for the rest."""
    method = config["methods"][wildcards.method]
    if method["algorithm"] != "blockpruner":
        return f"baseline-step --method {method['algorithm']}"
    screen = method.get("screen")
    if not screen:
        return "step"
    by_bi = screen.get("candidates_by_bi")
    return (f"step --screen-windows {screen['windows']} --confirm-top {screen['confirm_top']}"
            + (f" --candidates-by-bi {by_bi}" if by_bi else ""))


def step_inputs(wildcards, input):
    """`--model DIR --calib DIR [--prev step_<k-1>.json]` of a scoring job (derived from its inputs)."""
    prev = f" --prev {shlex.quote(input.prev[0])}" if input.prev else ""
    return (f"--model {shlex.quote(os.path.dirname(input.model))} --calib {shlex.quote(os.path.dirname(input.calib))}"
            + prev)


def shard_paths(wildcards):
    n = config["search"]["shards"]
    return [f"results/search/{wildcards.model}/{wildcards.calib}/{wildcards.method}/shards/step_{wildcards.k}.shard{i}of{n}.json"
            for i in range(n)]


# ------------------------------------------------------------------ prune.smk


def is_ratio(wildcards):
    return wildcards.pruning.startswith("r")


def pruning_steps(wildcards):
    if is_ratio(wildcards):
        return steps_upto(wildcards, MAX_K)
    return [step_path(wildcards.model, wildcards.calib, wildcards.method, int(wildcards.pruning[1:]))]


def pruning_option(wildcards, input):
    """`--step FILE` for a K target; `--steps FILES --ratio R` for a ratio target."""
    if not is_ratio(wildcards):
        return f"--step {shlex.quote(input.steps[0])}"
    no_embed = " --no-embed" if config["prunings"]["ratio_of"] == "no_embed" else ""
    return f"--ratio {float(wildcards.pruning[1:])}{no_embed} --steps " + " ".join(map(shlex.quote, input.steps))


# ------------------------------------------------------------------ evaluate.smk


def model_manifest(wildcards):
    """The directory an evaluation reads (as its manifest): the prepared model, or a pruned copy."""
    if wildcards.variant == "dense":
        return f"results/models/{wildcards.model}/manifest.json"
    return f"results/pruned/{wildcards.model}/{wildcards.variant}/manifest.json"


def perplexity_data():
    p = config["evaluate"]["perplexity"]
    return data_path(p["path"]) if p["path"] else p["hub"]


def perplexity_file(wildcards):
    p = config["evaluate"]["perplexity"]
    return [data_path(p["path"])] if p["path"] else []


def perplexity_hub_config():
    p = config["evaluate"]["perplexity"]
    return f"--hub-config {shlex.quote(p['hub_config'])}" if not p["path"] and p["hub_config"] else ""


def tasks_local_data():
    d = config["evaluate"]["tasks"]["local_data"]
    return f"--local-data {shlex.quote(data_path(d))}" if d else ""


def dense_model(wildcards):
    """The dense model as a baseline for a pruned variant's speed-up (none for dense itself)."""
    return [] if wildcards.variant == "dense" else [f"results/models/{wildcards.model}/manifest.json"]
