# Names and paths the rules share, computed from the validated config. Every results path comes
# from visae.layout (one definition of the results tree, shared with the report and the tests).
import json
import os
import shlex
from itertools import combinations
from snakemake.exceptions import WorkflowError

from visae.layout import (ALL_MODEL_FIGURES, ALL_MODELS, COMPARISON_TABLES, FIGURE_FORMATS, FIGURE_KINDS, INTERVENTION_FIGURES, LAYER_PREFIX,
                          MODEL_COMPARISON_FIGURES, PAIR_COMPARISON_FIGURES, SAEBENCH_FIGURES, TABLE_FORMATS, TASKS,
                          Layout, layer_dir, seed_twin)
from visae.sae.config import AT_MOST_WIDTH, COMMON_DEFAULTS, TRAIN_DEFAULTS, is_imported

RESULTS = Layout(config["results"])
# Every shell command ends so: its output goes to the job's log, and a failure shows the log's
# last line (the one-line `visae: error: ...`).
LOG_TAIL = " > {log:q} 2>&1 || (tail -n 1 {log:q} >&2; exit 1)"


def logged(command):
    """A rule's shell command with LOG_TAIL appended."""
    return command + LOG_TAIL


# Where `visae fetch fashion-mnist` puts the demo data (a dataset whose root is this folder
# depends on that rule; any other root is used as it is).
FASHION_MNIST_ROOT = "resources/fashion-mnist"
FASHION_MNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


def check_config():
    """Cross-references the JSON schema cannot express; fail before any job, naming the key."""
    for name, entry in config["models"].items():
        if "pretrain" in entry:
            if entry["source"] != "pretrain":
                raise WorkflowError(f"models.{name}.pretrain needs source: pretrain (got {entry['source']})")
            if entry["pretrain"]["dataset"] not in config["datasets"]:
                raise WorkflowError(
                    f"models.{name}.pretrain.dataset: {entry['pretrain']['dataset']!r} is not a key of "
                    f"datasets ({', '.join(config['datasets'])})"
                )
            if config["datasets"][entry["pretrain"]["dataset"]]["format"] != "fashion-mnist":
                raise WorkflowError(f"models.{name}.pretrain.dataset must be a fashion-mnist dataset")
        elif entry["source"] == "pretrain" and not entry.get("weights"):
            raise WorkflowError(f"models.{name}: source pretrain needs pretrain: or weights:")
    for dataset in config["extract"]["datasets"]:
        if dataset not in config["datasets"]:
            raise WorkflowError(
                f"extract.datasets: {dataset!r} is not a key of datasets ({', '.join(config['datasets'])})"
            )
    for name, entry in config["models"].items():
        if "pretrain" in entry:
            check_pretrain_root(name, entry["pretrain"]["dataset"])
    for model, entry in config["models"].items():
        d_model = plan_d_model(entry)
        if d_model is not None:
            for sae in config["saes"]:
                if not is_imported(config["saes"][sae]):
                    check_sae_width(model, d_model, sae, config["saes"][sae])
    check_imported()
    compare = config["compare"]
    for section in ("models", "saes"):
        for name in config[section]:
            if "__" in name or name.startswith("_") or name.endswith("_"):  # folders join two names with "__"
                raise WorkflowError(f"{section}.{name}: a name may not contain '__' nor start or end with '_'")
    for sae in compare["saes"] or []:
        if sae not in config["saes"]:
            raise WorkflowError(f"compare.saes: {sae!r} is not a key of saes ({', '.join(config['saes'])})")
    if compare["dataset"] is not None and compare["dataset"] not in config["extract"]["datasets"]:
        raise WorkflowError(f"compare.dataset: {compare['dataset']!r} is not one of extract.datasets "
                            f"({', '.join(config['extract']['datasets'])})")
    if compare["domain"] is not None and compare["domain"] not in config["datasets"]:
        raise WorkflowError(f"compare.domain: {compare['domain']!r} is not a key of datasets "
                            f"({', '.join(config['datasets'])})")
    hierarchy = compare["hierarchy"] or {}
    if len({"groups", "wordnet"} & set(hierarchy)) > 1:
        raise WorkflowError("compare.hierarchy: give groups or wordnet, not both")
    check_interventions()
    for sae in config["saebench"]["saes"] or []:
        if sae not in config["saes"]:
            raise WorkflowError(f"saebench.saes: {sae!r} is not a key of saes ({', '.join(config['saes'])})")


def check_interventions():
    """The interventions section's names: SAEs, models and datasets that exist (whether a dataset has
    masks is checked by `visae probe`, which opens it)."""
    section = config["interventions"]
    for sae in section["saes"]:
        if sae not in config["saes"]:
            raise WorkflowError(f"interventions.saes: {sae!r} is not a key of saes ({', '.join(config['saes'])})")
    for task in TASKS:
        if task not in section:
            continue
        for model in section[task]["models"] or []:
            if model not in config["models"]:
                raise WorkflowError(f"interventions.{task}.models: {model!r} is not a key of models "
                                    f"({', '.join(config['models'])})")
        for split in ("train", "test"):
            name = section[task][split]
            if name not in config["datasets"]:
                raise WorkflowError(f"interventions.{task}.{split}: {name!r} is not a key of datasets "
                                    f"({', '.join(config['datasets'])})")
    for model, saes in (section.get("segmentation") or {}).get("latents", {}).items():
        if model not in config["models"]:
            raise WorkflowError(f"interventions.segmentation.latents: {model!r} is not a key of models")
        for sae in saes:
            if sae not in section["saes"]:
                raise WorkflowError(f"interventions.segmentation.latents.{model}: {sae!r} is not one of "
                                    f"interventions.saes ({', '.join(section['saes']) or 'none'})")


def check_imported():
    """An imported SAE (`import:`) is a pass of its own and fits one model at one layer: a config of
    several models names a file per model, and every model has one layer."""
    for sae, entry in config["saes"].items():
        if not is_imported(entry):
            continue
        if "pass" in entry or any(other.get("pass") == sae for other in config["saes"].values()):
            raise WorkflowError(f"saes.{sae}: an imported SAE is a pass of its own (no pass: on it or naming it)")
        paths = entry["path"]
        if not isinstance(paths, dict) and len(config["models"]) > 1:
            raise WorkflowError(f"saes.{sae}.path: one file for models {', '.join(config['models'])}, but an SAE "
                                f"fits one model: give path: {{model: file}}")
        if isinstance(paths, dict) and set(paths) != set(config["models"]):
            other = sorted(set(paths) ^ set(config["models"]))[0]
            raise WorkflowError(f"saes.{sae}.path: {other!r} is " + ("not a key of models" if other in paths
                                else "a model without a file") + f" (models: {', '.join(config['models'])})")
        for model, model_entry in config["models"].items():
            if len(model_entry["layers"]) > 1:
                raise WorkflowError(f"saes.{sae}: model {model} has layers {model_entry['layers']}, but an "
                                    f"imported SAE fits one layer")


# d_model of architectures whose width is known without building them (a prefix of the arch
# name). Others, and those given model_kwargs without embed_dim, are checked by `visae train`.
KNOWN_D_MODEL = {"ViT-B-": 768, "ViT-L-": 1024, "ViT-H-": 1280, "vit_tiny_": 192, "vit_small_": 384,
                 "vit_base_": 768, "vit_large_": 1024, "vit_huge_": 1280}


def plan_d_model(entry):
    """The model's width if the config alone tells it (model_kwargs.embed_dim or a known arch)."""
    kwargs = entry.get("model_kwargs") or {}
    if "embed_dim" in kwargs:
        return int(kwargs["embed_dim"])
    return next((d for prefix, d in KNOWN_D_MODEL.items() if entry["arch"].startswith(prefix)), None)


def check_sae_width(model, d_model, sae, entry):
    """What `visae train` would refuse about k / k_aux against the SAE's width."""
    width = entry.get("width") or int(round(entry.get("expansion", COMMON_DEFAULTS["expansion"]) * d_model))
    where = f"saes.{sae}"
    for key in AT_MOST_WIDTH[entry["architecture"]]:
        if key in entry and entry[key] > width:
            raise WorkflowError(
                f"{where}.{key} = {entry[key]} exceeds the SAE's width {width} on model {model} "
                f"(d_model {d_model}): use {key} <= {width} or a larger expansion/width"
            )


def check_pretrain_root(model, dataset):
    """`visae pretrain` reads its dataset now: a root that no rule makes must exist."""
    root = config["datasets"][dataset].get("root")
    if root is None:  # the reader's own default (Debian's package): checked when it runs
        return
    if os.path.normpath(root) != FASHION_MNIST_ROOT and not os.path.isdir(root):
        raise WorkflowError(
            f"datasets.{dataset}.root: folder {root!r} does not exist (models.{model}.pretrain reads it)"
        )


check_config()

# The comparison's SAEs (before their second seeds join the grid) and its dataset.
COMPARED = list(config["saes"]) if config["compare"]["saes"] is None else list(config["compare"]["saes"])
COMPARE_DATASET = config["compare"]["dataset"] or config["extract"]["datasets"][0]


def add_seed_twins():
    """With compare.seeds: 2, every compared SAE gets a second entry `<sae>.seed1`: the same
    settings, an independent initialisation (its seed derives from its own name), trained in a
    pass of its own (`<pass>.seed1`, the same data order and split), so that turning the
    comparison on retrains nothing that exists. The seed baseline measures what initialisation
    alone changes."""
    if config["compare"]["seeds"] < 2:
        return
    for sae in COMPARED:
        if is_imported(config["saes"][sae]):
            continue  # trained elsewhere: no second seed to train
        twin = seed_twin(sae)
        if twin in config["saes"]:
            raise WorkflowError(f"saes.{twin}: the name is taken by compare.seeds' second seed of {sae}")
        entry = {k: v for k, v in config["saes"][sae].items() if k != "seed"}
        config["saes"][twin] = {**entry, "pass": seed_twin(config["saes"][sae].get("pass", sae))}


add_seed_twins()


def layer_names(model):
    return [layer_dir(layer) for layer in config["models"][model]["layers"]]


def stores():
    """(model, dataset, layer folder) of every activation store the config asks for."""
    return [
        (model, dataset, layer)
        for model in config["models"]
        for dataset in config["extract"]["datasets"]
        for layer in layer_names(model)
    ]


def sae_pass(sae):
    return config["saes"][sae].get("pass", sae)


def pass_members(name):
    return sorted(sae for sae in config["saes"] if sae_pass(sae) == name)


def sae_entry(sae):
    """A grid entry with the train: defaults filled in (the keys visae.sae.config marks
    train_default), as `visae train` receives it."""
    defaults = {k: v for k, v in config.get("train", {}).items() if k in TRAIN_DEFAULTS}
    entry = {**defaults, **config["saes"][sae], "name": sae}
    entry.pop("pass", None)
    return entry


def entry_json(section, name):
    """A config entry as the JSON object `visae` takes, so a job's command (and Snakemake's
    params check) changes only when that entry does. Workflow-only keys are left out."""
    entry = {k: v for k, v in config[section][name].items() if k not in ("layers", "pretrain")}
    return json.dumps({"name": name, **entry}, sort_keys=True)


def threads_env(threads):
    return f"OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}"


wildcard_constraints:
    model="[^/]+",
    dataset="[^/]+",
    layer=rf"{LAYER_PREFIX}-?[0-9]+",
    sae="[^/]+",
    pass_="[^/]+",
    model_a="[^/]+",
    model_b="[^/]+",
    layer_a=rf"{LAYER_PREFIX}-?[0-9]+",
    layer_b=rf"{LAYER_PREFIX}-?[0-9]+",
    sae_a="[^/]+",
    sae_b="[^/]+",


def dataset_files(name):
    """Files a job reading this dataset must wait for: the fetched demo data, if it is that."""
    entry = config["datasets"][name]
    if entry["format"] in ("fashion-mnist", "fashion-mnist-mosaic") and \
            os.path.normpath(entry.get("root", "")) == FASHION_MNIST_ROOT:
        return [f"{FASHION_MNIST_ROOT}/{file}" for file in FASHION_MNIST_FILES]
    return []


def pretrain_outputs():
    return [RESULTS.pretrain_model(model) for model, entry in config["models"].items() if "pretrain" in entry]


def pretrain_json(model):
    """A pretrain: model's entry as `visae pretrain --model` takes it (without the workflow's layers)."""
    entry = {k: v for k, v in config["models"][model].items() if k != "layers"}
    return json.dumps({"name": model, **entry}, sort_keys=True)


def pretrain_data(model):
    """`--data ROOT` for the pretrain: dataset's folder (none: `visae pretrain` uses Debian's copy)."""
    root = config["datasets"][config["models"][model]["pretrain"]["dataset"]].get("root")
    return f"--data {shlex.quote(root)}" if root else ""


def extract_outputs():
    return sorted({RESULTS.extract_marker(model, dataset) for model, dataset, _ in stores()})


def extract_weights(wildcards):
    """A model trained by `visae pretrain` is extracted from that job's weights."""
    if "pretrain" in config["models"][wildcards.model]:
        return {"weights": RESULTS.pretrain_model(wildcards.model)}
    return {}


def pass_outputs():
    return [
        RESULTS.sae_pass_marker(model, dataset, layer, name)
        for model, dataset, layer in stores()
        for name in sorted({sae_pass(sae) for sae in config["saes"]})
    ]


def sae_dir(model, dataset, layer, sae):
    return RESULTS.sae(model, dataset, layer, sae_pass(sae), sae)


def evaluate_outputs(which="metrics"):
    """Every evaluation's metrics.json (or latents.csv: which="latents")."""
    path = getattr(RESULTS, which)
    return [path(model, dataset, layer, sae) for model, dataset, layer in stores() for sae in config["saes"]]


def sae_logs():
    return [
        RESULTS.sae_log(model, dataset, layer, sae_pass(sae), sae)
        for model, dataset, layer in stores()
        for sae in config["saes"]
        if not is_imported(config["saes"][sae])  # no training log
    ]


def figure_outputs(ext):
    """Per model its figures, then the figures over every model (frontier_all)."""
    return ([RESULTS.figure(kind, model, ext) for model in config["models"] for kind in FIGURE_KINDS]
            + [RESULTS.figure(kind, ALL_MODELS, ext) for kind in ALL_MODEL_FIGURES])


def report_outputs():
    figures = [path for ext in FIGURE_FORMATS for path in figure_outputs(ext)]
    return [RESULTS.table("saes", ext) for ext in TABLE_FORMATS] + figures


def compare_stores():
    """(model, layer folder) of every store of the comparison's dataset."""
    return [(model, layer) for model in config["models"] for layer in layer_names(model)]


def profile_outputs():
    return [RESULTS.profile_marker(model, COMPARE_DATASET, layer, sae)
            for model, layer in compare_stores() for sae in COMPARED]


def model_pairs():
    """Every unordered pair of models, each pair's names in sorted order: a new model adds only its
    own pairs, and reordering the config replans nothing."""
    return list(combinations(sorted(config["models"]), 2))


def comparison_outputs(seed_baseline=False):
    """Every cross-model matching (or, seed_baseline, every model's SAE against its second seed)."""
    if seed_baseline:
        if config["compare"]["seeds"] < 2:
            return []
        return [RESULTS.comparison_marker(m, l, sae, m, l, seed_twin(sae), COMPARE_DATASET)
                for m, l in compare_stores() for sae in COMPARED if not is_imported(config["saes"][sae])]
    return [RESULTS.comparison_marker(a, la, sae, b, lb, sae, COMPARE_DATASET)
            for a, b in model_pairs() for la in layer_names(a) for lb in layer_names(b) for sae in COMPARED]


def similarity_outputs():
    return [RESULTS.similarity_marker(a, b, COMPARE_DATASET) for a, b in model_pairs()]


def model_weights(model):
    """`--weights PATH` for a model that `visae pretrain` trained (others name theirs in the entry)."""
    return f"--weights {shlex.quote(RESULTS.pretrain_model(model))}" if "pretrain" in config["models"][model] else ""


def compare_report_outputs(table_formats=TABLE_FORMATS, figure_formats=FIGURE_FORMATS):
    """The comparison's tables and figures (none when compare.saes is empty)."""
    if not COMPARED:
        return []
    tables = [RESULTS.comparison_table(name, ext) for name in COMPARISON_TABLES for ext in table_formats]
    figures = [RESULTS.comparison_figure(kind, model, ext) for ext in figure_formats for model in config["models"]
               for kind in MODEL_COMPARISON_FIGURES]
    figures += [RESULTS.comparison_figure(kind, f"{a}__{b}", ext) for ext in figure_formats for a, b in model_pairs()
                for kind in PAIR_COMPARISON_FIGURES]
    return tables + figures


def domain_flags():
    """`--domain-json ENTRY --domain-images N` when compare.domain names a dataset."""
    domain = config["compare"]["domain"]
    if domain is None:
        return ""
    return f"--domain-json {shlex.quote(entry_json('datasets', domain))} --domain-images {config['compare']['domain_images']}"


# -- the interventions ---------------------------------------------------------------------------

INTERVENED = list(config["interventions"]["saes"])


def task_models(task):
    """The models a task's probe and interventions run on (none when the task is not configured)."""
    section = config["interventions"].get(task)
    if section is None:
        return []
    return list(config["models"]) if section["models"] is None else list(section["models"])


def probe_outputs():
    return [RESULTS.probe_marker(task, model, config["interventions"][task]["test"])
            for task in TASKS for model in task_models(task)]


def intervention_outputs():
    return [RESULTS.intervention_marker(task, model, config["interventions"][task]["test"], layer, sae)
            for task in TASKS for model in task_models(task) for layer in layer_names(model) for sae in INTERVENED]


def intervened_indexes():
    """The latent index of every intervened SAE (the compare stage builds them: they hold the maxima)."""
    models = sorted({model for task in TASKS for model in task_models(task)})
    return [RESULTS.latent_index_marker(model, COMPARE_DATASET, layer, sae)
            for model in models for layer in layer_names(model) for sae in INTERVENED]


def intervened_tasks():
    return [task for task in TASKS if task_models(task) and INTERVENED]


def intervene_report_outputs(table_formats=TABLE_FORMATS, figure_formats=FIGURE_FORMATS):
    """The interventions' tables and figures (none when no SAE is intervened on)."""
    tables = [RESULTS.intervention_table(task, ext) for task in intervened_tasks() for ext in table_formats]
    figures = [RESULTS.intervention_figure(kind, task, model, ext) for ext in figure_formats
               for task in intervened_tasks() for model in task_models(task) for kind in INTERVENTION_FIGURES]
    return tables + figures


def task_dataset(task, split):
    """The key of a task's train or test dataset."""
    return config["interventions"][task][split]


def manual_latents(wc):
    """`--latents-json` of the segmentation's manual mode for this model and SAE ('' when none)."""
    if wc.task != "segmentation":
        return ""
    chosen = config["interventions"]["segmentation"]["latents"].get(wc.model, {}).get(wc.sae)
    return f"--latents-json {shlex.quote(json.dumps(chosen, sort_keys=True))}" if chosen else ""


def task_data(wc):
    return dataset_files(task_dataset(wc.task, "train")) + dataset_files(task_dataset(wc.task, "test"))


def task_flags(task):
    """The task's own settings of `visae intervene`."""
    section = config["interventions"][task]
    if task == "classification":
        return (f"--tokens {section['tokens']} --suppress-scale {section['suppress_scale']}"
                f" --insert-scale {section['insert_scale']} --insert-targets {section['insert_targets']}")
    return (f"--scale {section['scale']} --thresholds {' '.join(str(t) for t in section['thresholds'])}"
            f" --max-frequency {section['max_frequency']}")


def sample_flags(task):
    section = config["interventions"][task]
    return " ".join(f"--{key.replace('_', '-')} {section[key]}" for key in ("train_images", "test_images")
                    if section[key] is not None)


# -- the vision SAEBench -------------------------------------------------------------------------

# Second seeds are the stability baseline, not entries of their own.
SEED_TWINS = {seed_twin(sae) for sae in COMPARED} if config["compare"]["seeds"] >= 2 else set()
BENCHED = ([sae for sae in config["saes"] if sae not in SEED_TWINS] if config["saebench"]["saes"] is None
           else list(config["saebench"]["saes"]))


def saebench_outputs():
    return [RESULTS.saebench_marker(model, dataset, layer, sae) for model, dataset, layer in stores() for sae in BENCHED]


def saebench_indexes():
    """The latent index of every benched SAE on every store (the compare stage builds them)."""
    return [RESULTS.latent_index_marker(model, dataset, layer, sae)
            for model, dataset, layer in stores() for sae in BENCHED]


def saebench_twin(wc):
    """The pass marker of the SAE's second seed when the comparison trains one (else none)."""
    twin = seed_twin(wc.sae)
    if twin not in config["saes"]:
        return []
    return [RESULTS.sae_pass_marker(wc.model, wc.dataset, wc.layer, sae_pass(twin))]


def saebench_flags(wc):
    """`--twin` (stability) and `--hierarchy` (absorption, on the compared dataset only)."""
    flags = []
    if saebench_twin(wc):
        flags.append(f"--twin {shlex.quote(sae_dir(wc.model, wc.dataset, wc.layer, seed_twin(wc.sae)))}")
    if wc.dataset == COMPARE_DATASET and config["compare"]["hierarchy"]:
        flags.append(f"--hierarchy {shlex.quote(json.dumps(config['compare']['hierarchy'], sort_keys=True))}")
    section = config["saebench"]
    if section["max_classes"] is not None:
        flags.append(f"--max-classes {section['max_classes']}")
    return " ".join(flags)


def saebench_report_outputs(table_formats=TABLE_FORMATS, figure_formats=FIGURE_FORMATS):
    """Per store a table, DVC's metrics file, per model a figure (none when no SAE is benched)."""
    if not BENCHED:
        return []
    tables = [RESULTS.saebench_table(model, dataset, layer, ext)
              for model, dataset, layer in stores() for ext in table_formats]
    figures = [RESULTS.saebench_figure(model, ext) for ext in figure_formats for model in config["models"]]
    return tables + [RESULTS.saebench_metrics()] + figures


# -- the latent browser --------------------------------------------------------------------------

# Every SAE with a latent index on the compared dataset gets pages (second seeds are baselines).
BROWSED = [sae for sae in dict.fromkeys(COMPARED + INTERVENED + BENCHED) if sae not in SEED_TWINS]


def browser_indexes():
    return [RESULTS.latent_index_marker(model, COMPARE_DATASET, layer, sae)
            for model, layer in compare_stores() for sae in BROWSED]


def browser_outputs():
    return [RESULTS.browser_index()] if BROWSED else []
