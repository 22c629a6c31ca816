"""The results tree: every path a stage writes, defined once.

The workflow's rules, the report and the tests build paths here and nowhere else. Arguments are
names (model, dataset, SAE, pass) or Snakemake wildcards such as "{model}"; a layer is its number
(2, -2) or its folder name ("layer_2", "{layer}"). Stdlib only: the Snakefile imports this.

```
<results>/
  pretrain/<model>/model.safetensors            the demo's own backbones (`visae pretrain`)
  activations/<model>/<dataset>/extract.json    one extraction job's marker, beside its stores:
  activations/<model>/<dataset>/layer_<L>/      an activation store (meta.json, shards)
  saes/<model>/<dataset>/layer_<L>/<pass>/      one training pass (provenance.json marks it done)
  saes/.../<pass>/<sae>/                        an SAE checkpoint (config.json, log.csv, weights)
  evaluate/<model>/<dataset>/layer_<L>/<sae>/   metrics.json, latents.csv
  latents/<model>/<dataset>/layer_<L>/<sae>/    the latent index: index.json, index.safetensors
  profiles/<model>/<dataset>/layer_<L>/<sae>/   abstraction, invariance, concept probe of one SAE
  compare/<a>__<b>/<dataset>/<La>__<Lb>/<sae_a>__<sae_b>/   latent matching of two SAEs (a == b:
                                                the seed baseline, sae_b the second seed)
  compare/<a>__<b>/<dataset>/similarity/        CKA and mutual kNN of two models, per layer pair
  compare/tables/<name>.<ext>, compare/figures/<kind>_<model or a__b>.<ext>   the comparison's report
  probes/<task>/<model>/<dataset>/               a linear probe on the final layer (probe.json,
                                                probe.safetensors), its random-init baseline inside
  interventions/<task>/<model>/<dataset>/layer_<L>/<sae>/   the edit scored on the task's probe:
                                                intervention.json, classes.csv, dose.csv, examples.safetensors
  interventions/tables/<task>.<ext>, interventions/figures/<kind>_<task>_<model>.<ext>   their report
  saebench/<model>/<dataset>/layer_<L>/<sae>/   the vision SAEBench of one SAE: saebench.json,
                                                sparse_probing.csv, tpp.csv, absorption.csv
  saebench/tables/<model>__<dataset>__layer_<L>.<ext>, saebench/figures/saebench_<model>.<ext>   their
                                                report; metrics/saebench.json: DVC's metrics file of them
  tables/<name>.<ext>, figures/<kind>_<model>.<ext>, browser/, README.md, report.html
  logs/<stage>/....log, benchmarks/<stage>/....tsv
  bench/<name>.json                             `visae bench` results
```
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

from visae.errors import VisaeError

LAYER_PREFIX = "layer_"
# The files inside the tree: the commands that write them and the rules that wait for them share these.
PRETRAIN_WEIGHTS = "model.safetensors"  # `visae pretrain`, written last
PRETRAIN_LOG = "log.csv"  # `visae pretrain`'s per-step log
EXTRACT_MARKER = "extract.json"  # one extraction job done, beside its stores
RUN_MARKER = "provenance.json"  # a training pass (or any stage's run) done, written last
SAE_LOG = "log.csv"  # an SAE's per-step training log
METRICS = "metrics.json"  # an evaluation done, written last
LATENTS = "latents.csv"  # an evaluation's per-latent frequency and mean activation
LATENT_INDEX = "index.json"  # a latent index done, written last (`visae latents`)
LATENT_ARRAYS = "index.safetensors"  # the latent index's arrays
PROFILE = "profile.json"  # a profile (abstraction, invariance, concept probe) done, written last
PROFILE_LATENTS = "profile_latents.csv"  # a profile's per-latent table
CONCEPTS = "concepts.csv"  # a profile's per-class concept probe
MATCHING = "matching.json"  # a latent matching done, written last
MATCHES = "matches.csv"  # a matching's per-latent table (both sides)
EXEMPLARS = "exemplars.safetensors"  # a matching's unique latents: thumbnails and patch heatmaps
SIMILARITY = "similarity.json"  # a model pair's CKA / mutual kNN done, written last
PROBE = "probe.json"  # a probe done, written last (`visae probe`)
PROBE_WEIGHTS = "probe.safetensors"  # the probe's weights and standardisation
INTERVENTION = "intervention.json"  # an intervention done, written last (`visae intervene`)
INTERVENTION_CLASSES = "classes.csv"  # an intervention's per-class, per-method rows
INTERVENTION_DOSE = "dose.csv"  # an intervention's dose-response rows (method, scale)
INTERVENTION_EXAMPLES = "examples.safetensors"  # images, heatmaps, predictions before/after for the figure
SEED_TWIN = ".seed1"  # `<sae>.seed1`: the compared SAE's second seed (the seed baseline)
TABLE_FORMATS = ("md", "csv", "tex", "json")
FIGURE_FORMATS = ("png", "pdf")
FIGURE_KINDS = ("frontier", "latent_freq", "training")
ALL_MODELS = "all"  # the name in the file names of the figures over every model: figure(kind, ALL_MODELS, ext)
ALL_MODEL_FIGURES = ("frontier",)  # frontier_all: every model's SAEs on one L0-NMSE plot
COMPARISON_TABLES = ("profiles", "matching", "similarity")
MODEL_COMPARISON_FIGURES = ("abstraction", "invariance", "exemplars")  # one per model
PAIR_COMPARISON_FIGURES = ("matching", "exemplars")  # one per pair of models, named a__b
TASKS = ("classification", "segmentation")  # the intervention tasks; one table each
INTERVENTION_FIGURES = ("dose", "example")  # one per (task, model), named <kind>_<task>_<model>
SAEBENCH = "saebench.json"  # one SAE's vision SAEBench done, written last (`visae saebench`)
SAEBENCH_PROBING = "sparse_probing.csv"  # per (class, k, method) sparse-probing accuracy
SAEBENCH_TPP = "tpp.csv"  # per (class, method) targeted probe perturbation
SAEBENCH_ABSORPTION = "absorption.csv"  # per (group, fine class) absorption
SAEBENCH_FIGURES = ("saebench",)  # one per model: every metric against L0, per architecture
BROWSER_INDEX = "index.html"  # the latent browser's entry page, written last


def layer_dir(layer: int | str) -> str:
    """A store's folder name: the layer as given (`layer_-2`); a folder name or wildcard passes through."""
    if isinstance(layer, bool):
        raise TypeError(f"layer must be an int or a folder name, not {layer!r}")
    if isinstance(layer, int) or re.fullmatch(r"-?\d+", str(layer)):
        return f"{LAYER_PREFIX}{int(layer)}"
    return str(layer)


def model_slug(model: str) -> str:
    """A model name as it appears in file names (characters outside [A-Za-z0-9._-] become `_`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(model)) or "_"


def seed_twin(sae: str) -> str:
    """The name of an SAE's second-seed copy, trained for the comparison's seed baseline."""
    return f"{sae}{SEED_TWIN}"


def figure_name(kind: str, model: str) -> str:
    """A figure's file name without its extension: `<kind>_<model slug>`."""
    return f"{kind}_{model_slug(model)}"


def _join(base: str, *names: str) -> str:
    return str(PurePosixPath(base, *names))


class Layout:
    """Paths under one results folder (the config's `results:`), as POSIX strings."""

    def __init__(self, root: str = "results"):
        self.root = str(PurePosixPath(str(root)))

    def _path(self, *parts) -> str:
        return str(PurePosixPath(self.root, *(str(p) for p in parts)))

    # -- the demo's own backbones
    def pretrain_dir(self, model: str) -> str:
        return self._path("pretrain", model)

    def pretrain_model(self, model: str) -> str:
        return self._path("pretrain", model, PRETRAIN_WEIGHTS)

    # -- activation stores
    def extract_marker(self, model: str, dataset: str) -> str:
        return self._path("activations", model, dataset, EXTRACT_MARKER)

    def store(self, model: str, dataset: str, layer) -> str:
        return self._path("activations", model, dataset, layer_dir(layer))

    # -- SAEs
    def sae_pass(self, model: str, dataset: str, layer, pass_: str) -> str:
        return self._path("saes", model, dataset, layer_dir(layer), pass_)

    def sae_pass_marker(self, model: str, dataset: str, layer, pass_: str) -> str:
        return _join(self.sae_pass(model, dataset, layer, pass_), RUN_MARKER)

    def sae(self, model: str, dataset: str, layer, pass_: str, sae: str) -> str:
        return _join(self.sae_pass(model, dataset, layer, pass_), sae)

    def sae_log(self, model: str, dataset: str, layer, pass_: str, sae: str) -> str:
        return _join(self.sae(model, dataset, layer, pass_, sae), SAE_LOG)

    # -- analyses of one SAE on one store
    def evaluation(self, model: str, dataset: str, layer, sae: str) -> str:
        return self._path("evaluate", model, dataset, layer_dir(layer), sae)

    def metrics(self, model: str, dataset: str, layer, sae: str) -> str:
        return _join(self.evaluation(model, dataset, layer, sae), METRICS)

    def latents(self, model: str, dataset: str, layer, sae: str) -> str:
        return _join(self.evaluation(model, dataset, layer, sae), LATENTS)

    def latent_index(self, model: str, dataset: str, layer, sae: str) -> str:
        return self._path("latents", model, dataset, layer_dir(layer), sae)

    def latent_index_marker(self, model: str, dataset: str, layer, sae: str) -> str:
        return _join(self.latent_index(model, dataset, layer, sae), LATENT_INDEX)

    def profile(self, model: str, dataset: str, layer, sae: str) -> str:
        return self._path("profiles", model, dataset, layer_dir(layer), sae)

    def profile_marker(self, model: str, dataset: str, layer, sae: str) -> str:
        return _join(self.profile(model, dataset, layer, sae), PROFILE)

    def comparison(self, model_a: str, layer_a, sae_a: str, model_b: str, layer_b, sae_b: str, dataset: str) -> str:
        """Latent matching of SAE `sae_a` on (model_a, layer_a) with `sae_b` on (model_b, layer_b)."""
        return self._path("compare", f"{model_a}__{model_b}", dataset, f"{layer_dir(layer_a)}__{layer_dir(layer_b)}",
                          f"{sae_a}__{sae_b}")

    def comparison_marker(self, model_a: str, layer_a, sae_a: str, model_b: str, layer_b, sae_b: str,
                          dataset: str) -> str:
        return _join(self.comparison(model_a, layer_a, sae_a, model_b, layer_b, sae_b, dataset), MATCHING)

    def comparison_tables_dir(self) -> str:
        return self._path("compare", "tables")

    def comparison_table(self, name: str, ext: str) -> str:
        return self._path("compare", "tables", f"{name}.{ext}")

    def comparison_figures_dir(self) -> str:
        return self._path("compare", "figures")

    def comparison_figure(self, kind: str, name: str, ext: str) -> str:
        """A comparison figure of one model (abstraction, invariance) or one pair `a__b` (matching, exemplars)."""
        return self._path("compare", "figures", f"{figure_name(kind, name)}.{ext}")

    def similarity(self, model_a: str, model_b: str, dataset: str) -> str:
        return self._path("compare", f"{model_a}__{model_b}", dataset, "similarity")

    def similarity_marker(self, model_a: str, model_b: str, dataset: str) -> str:
        return _join(self.similarity(model_a, model_b, dataset), SIMILARITY)

    def probe(self, task: str, model: str, dataset: str) -> str:
        """A linear probe of `task` on `model`'s final layer, scored on `dataset` (the test images)."""
        return self._path("probes", task, model, dataset)

    def probe_marker(self, task: str, model: str, dataset: str) -> str:
        return _join(self.probe(task, model, dataset), PROBE)

    def intervention(self, task: str, model: str, dataset: str, layer, sae: str) -> str:
        """SAE `sae` (of `model` at `layer`) edited inside the model and scored on the task's probe on `dataset`."""
        return self._path("interventions", task, model, dataset, layer_dir(layer), sae)

    def intervention_marker(self, task: str, model: str, dataset: str, layer, sae: str) -> str:
        return _join(self.intervention(task, model, dataset, layer, sae), INTERVENTION)

    def intervention_tables_dir(self) -> str:
        return self._path("interventions", "tables")

    def intervention_table(self, task: str, ext: str) -> str:
        return self._path("interventions", "tables", f"{task}.{ext}")

    def intervention_figures_dir(self) -> str:
        return self._path("interventions", "figures")

    def intervention_figure(self, kind: str, task: str, model: str, ext: str) -> str:
        """`dose` (the dose-response curves) or `example` (one edited image) of one task on one model."""
        return self._path("interventions", "figures", f"{figure_name(f'{kind}_{task}', model)}.{ext}")

    def saebench(self, model: str, dataset: str, layer, sae: str) -> str:
        return self._path("saebench", model, dataset, layer_dir(layer), sae)

    def saebench_marker(self, model: str, dataset: str, layer, sae: str) -> str:
        return _join(self.saebench(model, dataset, layer, sae), SAEBENCH)

    def saebench_tables_dir(self) -> str:
        return self._path("saebench", "tables")

    def saebench_table(self, model: str, dataset: str, layer, ext: str) -> str:
        """One store's table: every SAEBench metric of every SAE trained on it."""
        return self._path("saebench", "tables", f"{model_slug(model)}__{dataset}__{layer_dir(layer)}.{ext}")

    def saebench_metrics(self) -> str:
        """DVC's metrics file of the SAEBench: {model/dataset/layer_L/sae: {metric: value}}."""
        return self._path("metrics", "saebench.json")  # outside saebench/: DVC outputs may not overlap

    def saebench_figures_dir(self) -> str:
        return self._path("saebench", "figures")

    def saebench_figure(self, model: str, ext: str) -> str:
        return self._path("saebench", "figures", f"{figure_name('saebench', model)}.{ext}")

    # -- the report
    def tables_dir(self) -> str:
        return self._path("tables")

    def table(self, name: str, ext: str) -> str:
        return self._path("tables", f"{name}.{ext}")

    def figures_dir(self) -> str:
        return self._path("figures")

    def figure(self, kind: str, model: str, ext: str) -> str:
        return self._path("figures", f"{figure_name(kind, model)}.{ext}")

    def browser(self) -> str:
        return self._path("browser")

    def browser_index(self) -> str:
        return self._path("browser", BROWSER_INDEX)

    def readme(self) -> str:
        return self._path("README.md")

    def report_html(self) -> str:
        return self._path("report.html")

    def bench_dir(self) -> str:
        """Where `visae bench <name>` writes `<name>.json` (benchmarks: not a stage of the DAG)."""
        return self._path("bench")

    # -- every job's log and benchmark
    def log(self, stage: str, *names: str) -> str:
        return self._path("logs", stage, *names[:-1], f"{names[-1]}.log")

    def benchmark(self, stage: str, *names: str) -> str:
        return self._path("benchmarks", stage, *names[:-1], f"{names[-1]}.tsv")


@dataclass(frozen=True)
class Identity:
    """What a result file is about; written into the file so that no reader guesses from its path."""

    model: str
    dataset: str
    layer: int | str
    sae: str
    store_hash: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def key(self) -> str:
        """`model/dataset/layer_L/sae`: how tables key a result."""
        return f"{self.model}/{self.dataset}/{layer_dir(self.layer)}/{self.sae}"

    @classmethod
    def from_file(cls, obj, path) -> Identity:
        """The `identity` block of a result file's JSON, checked; a one-line error names the file."""
        block = obj.get("identity") if isinstance(obj, dict) else None
        if not isinstance(block, dict):
            raise VisaeError(f"{path} has no 'identity' block (model, dataset, layer, sae, store_hash): "
                             f"it was written by an older visae; rerun the stage that wrote it")
        missing = [k for k in cls.__dataclass_fields__ if block.get(k) in (None, "")]
        if missing:
            raise VisaeError(f"{path}: identity lacks {', '.join(missing)}")
        layer = block["layer"]
        if not isinstance(layer, int) and re.fullmatch(r"-?\d+", str(layer)):
            layer = int(layer)  # a CSV's "2" is the layer 2
        return cls(model=str(block["model"]), dataset=str(block["dataset"]),
                   layer=layer if isinstance(layer, int) and not isinstance(layer, bool) else str(layer),
                   sae=str(block["sae"]), store_hash=str(block["store_hash"]))

    @classmethod
    def of(cls, model, dataset, layer, sae: str, store_hash: str) -> Identity:
        """An SAE on a store, from the store's metadata: its model and dataset (an entry with a
        `name`, or a name) and its layer."""

        def name(value):
            return value.get("name") if isinstance(value, dict) else value

        return cls(model=str(name(model)), dataset=str(name(dataset)), layer=layer, sae=str(sae),
                   store_hash=str(store_hash))
