# The interventions (paper section 5): per task and model a linear probe on the final layer (with
# its random-init baseline inside), then per SAE the edit at the SAE's layer scored on that probe
# against a random latent and a random direction. The jobs that run the model hold a GPU on cuda.

INTERVENE_GPU = 1 if config["interventions"]["device"] == "cuda" else 0


rule probe:
    input:
        weights=lambda wc: extract_weights(wc).values(),
        data=task_data,
    output:
        RESULTS.probe_marker("{task}", "{model}", "{dataset}"),
    params:
        out=lambda wc, output: os.path.dirname(output[0]),
        env=lambda wc, threads: threads_env(threads),
        model=lambda wc: entry_json("models", wc.model),
        weights=lambda wc: model_weights(wc.model),
        train=lambda wc: entry_json("datasets", task_dataset(wc.task, "train")),
        test=lambda wc: entry_json("datasets", task_dataset(wc.task, "test")),
        samples=lambda wc: sample_flags(wc.task),
        lrs=" ".join(str(v) for v in config["interventions"]["probe"]["lrs"]),
        wds=" ".join(str(v) for v in config["interventions"]["probe"]["weight_decays"]),
        steps=config["interventions"]["probe"]["steps"],
        val=config["interventions"]["probe"]["val_fraction"],
        batch=config["interventions"]["batch_size"],
        seed=config["interventions"]["seed"],
        device=config["interventions"]["device"],
    wildcard_constraints:
        task="|".join(TASKS),
    log:
        RESULTS.log("probe", "{task}", "{model}", "{dataset}"),
    benchmark:
        RESULTS.benchmark("probe", "{task}", "{model}", "{dataset}")
    threads: 1
    resources:
        mem_mb=2000,
        gpu=INTERVENE_GPU,
    shell:
        logged(
            "{params.env} visae probe --task {wildcards.task} --model {params.model:q} {params.weights}"
            " --train {params.train:q} --test {params.test:q} {params.samples}"
            " --lrs {params.lrs} --weight-decays {params.wds} --steps {params.steps} --val-fraction {params.val}"
            " --batch-size {params.batch} --seed {params.seed} --device {params.device} --out {params.out:q}"
        )


rule intervene:
    input:
        index=lambda wc: RESULTS.latent_index_marker(wc.model, COMPARE_DATASET, wc.layer, wc.sae),
        probe=RESULTS.probe_marker("{task}", "{model}", "{dataset}"),
        weights=lambda wc: extract_weights(wc).values(),
        data=task_data,
    output:
        RESULTS.intervention_marker("{task}", "{model}", "{dataset}", "{layer}", "{sae}"),
    params:
        index=lambda wc, input: os.path.dirname(input.index),
        probe=lambda wc, input: os.path.dirname(input.probe),
        out=lambda wc, output: os.path.dirname(output[0]),
        env=lambda wc, threads: threads_env(threads),
        model=lambda wc: entry_json("models", wc.model),
        weights=lambda wc: model_weights(wc.model),
        layer=lambda wc: wc.layer[len(LAYER_PREFIX):],
        task=lambda wc: task_flags(wc.task),
        manual=manual_latents,
        scales=" ".join(str(v) for v in config["interventions"]["scales"]),
        examples=config["interventions"]["examples"],
        batch=config["interventions"]["batch_size"],
        seed=config["interventions"]["seed"],
        device=config["interventions"]["device"],
    wildcard_constraints:
        task="|".join(TASKS),
    log:
        RESULTS.log("intervene", "{task}", "{model}", "{dataset}", "{layer}", "{sae}"),
    benchmark:
        RESULTS.benchmark("intervene", "{task}", "{model}", "{dataset}", "{layer}", "{sae}")
    threads: 1
    resources:
        mem_mb=2000,
        gpu=INTERVENE_GPU,
    shell:
        logged(
            "{params.env} visae intervene --task {wildcards.task} --index {params.index:q} --probe {params.probe:q}"
            " --model {params.model:q} {params.weights} --layer={params.layer} --out {params.out:q}"
            " --scales {params.scales} {params.task} {params.manual} --examples {params.examples}"
            " --batch-size {params.batch} --seed {params.seed} --device {params.device}"
        )


rule intervene_report:
    input:
        intervention_outputs(),
    output:
        # kind: the task; its table's caption is classification.rst or segmentation.rst
        [report(RESULTS.intervention_table(kind, "md"), caption=f"../report/{kind}.rst", category="3 Interventions",
                subcategory="Tables", labels={"table": f"Table {TASKS.index(kind) + 3}: {kind}"})
         for kind in intervened_tasks()],
        [report(RESULTS.intervention_figure(kind, task, model, "png"), caption=f"../report/{kind}.rst",
                category="3 Interventions", subcategory=task, labels={"model": model, "figure": kind})
         for task in intervened_tasks() for model in task_models(task) for kind in INTERVENTION_FIGURES],
        intervene_report_outputs(table_formats=[f for f in TABLE_FORMATS if f != "md"],
                                 figure_formats=[f for f in FIGURE_FORMATS if f != "png"]),
    params:
        tables=lambda wc, output: os.path.dirname(output[0]),  # intervention_tables_dir()
        figures=lambda wc, output: os.path.dirname(output[len(intervened_tasks())]),  # intervention_figures_dir()
    log:
        RESULTS.log("report", "interventions"),
    benchmark:
        RESULTS.benchmark("report", "interventions")
    shell:
        logged(
            "visae report interventions --results {input:q} --tables {params.tables:q} --figures {params.figures:q}"
        )


rule intervene_all:
    input:
        intervene_report_outputs(),
