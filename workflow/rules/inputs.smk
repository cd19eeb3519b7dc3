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


def methods_regex(sharded=None):
    """The block-removal methods (None: all of them, refinements included), or the step-writing
    searches sharded or not, as a wildcard constraint."""
    names = SEARCH_METHODS if sharded is None else [m for m in STEP_METHODS if is_sharded(m) == sharded]
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
    comp = method.get("compensation", "none")
    if comp != "none":
        alpha = compensation_alpha(comp)
        return f"step --compensation {comp}" + (f" --compensation-alpha {alpha!r}" if alpha is not None else "")
    screen = method.get("screen")
    if not screen:
        return "step"
    by_bi = screen.get("candidates_by_bi")
    return (f"step --screen-windows {screen['windows']} --confirm-top {screen['confirm_top']}"
            + (f" --candidates-by-bi {by_bi}" if by_bi else ""))


def engine_options(wildcards):
    """The scoring engine's settings of a BlockPruner step (`--head-bound-columns`,
    `--window-batch`); baselines take none."""
    if config["methods"][wildcards.method]["algorithm"] != "blockpruner":
        return ""
    search = config["search"]
    return f"--head-bound-columns {search['head_bound_columns']} --window-batch {search['window_batch']}"


def step_arguments(wildcards, input):
    """A scoring job's command line but its output, for search_step and search_shard alike:
    the subcommand, its inputs, the step, the candidates, the engine's settings, numerics and
    devices (every part a param, so a change to any reruns the step)."""
    method = config["methods"][wildcards.method]
    parts = [step_command(wildcards), step_inputs(wildcards, input), f"--k {wildcards.k}",
             f"--candidates {method['candidates']}", engine_options(wildcards), f"--numerics {config['numerics']}",
             option("--device-map", "models/{model}/device_map")(wildcards), "--device auto", "--no-progress"]
    return " ".join(p for p in parts if p)


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
    """The step files a pruning reads: step_K, steps 1..max_k for a ratio target, a refinement's refined set."""
    if wildcards.method in REFINE_METHODS:
        return [refined_path(wildcards.model, wildcards.calib, wildcards.method, wildcards.pruning)]
    if is_ratio(wildcards):
        return steps_upto(wildcards, MAX_K)
    return [step_path(wildcards.model, wildcards.calib, wildcards.method, int(wildcards.pruning[1:]))]


def pruning_option(wildcards, input):
    """`--step FILE` for a K target; `--steps FILES --ratio R` for a ratio target."""
    if not is_ratio(wildcards) or wildcards.method in REFINE_METHODS:
        return f"--step {shlex.quote(input.steps[0])}"
    no_embed = " --no-embed" if config["prunings"]["ratio_of"] == "no_embed" else ""
    return f"--ratio {float(wildcards.pruning[1:])}{no_embed} --steps " + " ".join(map(shlex.quote, input.steps))


# ------------------------------------------------------------------ refine.smk


def refine_regex():
    return "|".join(map(re.escape, REFINE_METHODS)) if REFINE_METHODS else NEVER


def refined_search(wildcards):
    """A refinement's wildcards with its method replaced by the search it refines (`from`)."""
    return Namespace(model=wildcards.model, calib=wildcards.calib, method=config["methods"][wildcards.method]["from"],
                     pruning=wildcards.pruning)


def refine_start(wildcards):
    """The steps of the refined search that a pruning starts from (as pruning_steps gives them)."""
    return pruning_steps(refined_search(wildcards))


def refine_start_option(wildcards, input):
    """`--step FILE` (a K target) or `--steps FILES --ratio R` (a ratio target): the set to refine."""
    return pruning_option(refined_search(wildcards), input)


def refine_arguments(wildcards):
    """The refinement's own options: method and settings, the engine's and the numerics (each a param)."""
    method = config["methods"][wildcards.method]
    parts = [f"--method {method['refine']}"]
    for key, value in sorted((method.get("settings") or {}).items()):
        if isinstance(value, bool):
            parts.append(f"--{key.replace('_', '-')}" if value else "")
        elif key == "selection":
            parts.append(f"--selection {','.join(f'{w}:{s}' for w, s in value)}")
        else:
            parts.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    search = config["search"]
    parts += [f"--head-bound-columns {search['head_bound_columns']} --window-batch {search['window_batch']}",
              f"--numerics {config['numerics']}", option("--device-map", "models/{model}/device_map")(wildcards),
              "--device auto", "--no-progress"]
    return " ".join(p for p in parts if p)


# ------------------------------------------------------------------ compress.smk


def compress_regex():
    return "|".join(map(re.escape, COMPRESS_METHODS)) if COMPRESS_METHODS else NEVER


def compress_settings(wildcards):
    """The method's settings as one JSON object (keys it leaves out take the algorithm's defaults)."""
    return json.dumps(config["methods"][wildcards.method].get("settings") or {}, sort_keys=True)


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


def tasks_bos():
    """evaluate.tasks.add_bos_token (auto | true | false) as the CLI's auto | yes | no."""
    return {True: "yes", False: "no"}.get(config["evaluate"]["tasks"]["add_bos_token"], "auto")


def tasks_local_data():
    d = config["evaluate"]["tasks"]["local_data"]
    return f"--local-data {shlex.quote(data_path(d))}" if d else ""


def card_evals(model, variant):
    """A variant's perplexity and task results, where the study evaluates them (for its model card)."""
    return [f"results/eval/{model}/{variant}/{kind}.json" for kind in EVAL_KINDS if kind != "speed"]


def variant_evals(wildcards):
    return card_evals(wildcards.model, wildcards.variant)


def dense_evals(wildcards):
    """The dense model's results, where the study evaluates the dense model."""
    return card_evals(wildcards.model, "dense") if config["evaluate"]["dense"] else []


def dense_model(wildcards):
    """The dense model as a baseline for a pruned variant's speed-up (none for dense itself)."""
    return [] if wildcards.variant == "dense" else [f"results/models/{wildcards.model}/manifest.json"]


# ------------------------------------------------------------------ compensate.smk


def compensations():
    """The correction methods of prunings.compensate (none, the uncompensated model, is always evaluated)."""
    return [c for c in config["prunings"].get("compensate", ["none"]) if c != "none"]


def compensation_regex():
    return "|".join(map(re.escape, compensations())) if compensations() else NEVER


def compensated_variants(model):
    """{calib}/{method}/{pruning}+{compensation} of every search method's pruning of a model."""
    return [f"{c}/{m}/{p}+{comp}" for c in CALIBS for m in SEARCH_METHODS for p in pruning_labels(m, model)
            for comp in compensations()]


def compensation_alpha(method):
    """compensation.<method>_alpha as a float, None where unset (the command's default)."""
    alpha = (config.get("compensation") or {}).get(f"{method}_alpha")
    return None if alpha is None else float(alpha)


def compensation_options(wildcards):
    """`--alpha A` (when set for this method), `--max-windows N` (when set), `--no-guard` (guard: false)."""
    settings = config.get("compensation") or {}
    alpha = compensation_alpha(wildcards.comp)
    windows = settings.get("max_windows")
    return ((f"--alpha {alpha!r}" if alpha is not None else "") + (f" --max-windows {int(windows)}" if windows else "")
            + ("" if settings.get("guard", True) else " --no-guard"))


# ------------------------------------------------------------------ analyses.smk


def budget_ratio():
    """analyses.budget_ratio, else the study's first ratio target, else none."""
    r = config["analyses"]["budget_ratio"]
    return r if r is not None else (RATIOS[0] if RATIOS else None)


def analysis_budget(wildcards):
    """`--ratio R` for the analyses that compare searches at a budget (Table 7, Figure 7)."""
    r = budget_ratio()
    return f"--ratio {r}" if r is not None and wildcards.analysis in ("time", "calibration") else ""
