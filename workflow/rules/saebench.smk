# The vision SAEBench: per SAE on each store, what a user needs from it beyond reconstruction
# (sparse probing, targeted probe perturbation, absorption, shrinkage, stability), each metric
# beside its baseline from the same run; then one table per store and one figure per model.

SAEBENCH_GPU = 1 if config["saebench"]["device"] == "cuda" else 0


rule saebench:
    input:
        index=RESULTS.latent_index_marker("{model}", "{dataset}", "{layer}", "{sae}"),
        twin=saebench_twin,
    output:
        RESULTS.saebench_marker("{model}", "{dataset}", "{layer}", "{sae}"),
    params:
        index=lambda wc, input: os.path.dirname(input.index),
        out=lambda wc, output: os.path.dirname(output[0]),
        env=lambda wc, threads: threads_env(threads),
        flags=saebench_flags,
        k=" ".join(str(k) for k in config["saebench"]["k"]),
        tpp=config["saebench"]["tpp_latents"],
        threshold=config["saebench"]["stability_threshold"],
        train=config["saebench"]["train_fraction"],
        batch=config["saebench"]["batch_size"],
        seed=config["saebench"]["seed"],
        device=config["saebench"]["device"],
    log:
        RESULTS.log("saebench", "{model}", "{dataset}", "{layer}", "{sae}"),
    benchmark:
        RESULTS.benchmark("saebench", "{model}", "{dataset}", "{layer}", "{sae}")
    threads: 1
    resources:
        mem_mb=2000,
        gpu=SAEBENCH_GPU,
    shell:
        logged(
            "{params.env} visae saebench --index {params.index:q} {params.flags} --k {params.k}"
            " --tpp-latents {params.tpp} --stability-threshold {params.threshold} --train-fraction {params.train}"
            " --batch-size {params.batch} --seed {params.seed} --device {params.device} --out {params.out:q}"
        )


rule saebench_report:
    input:
        saebench_outputs(),
    output:
        [
            report(RESULTS.saebench_table(model, dataset, layer, "md"), caption="../report/saebench_table.rst",
                   category="4 SAEBench", subcategory="Tables", labels={"store": f"{model} · {dataset} · {layer}"})
            for model, dataset, layer in stores()
        ] if BENCHED else [],
        [
            report(RESULTS.saebench_figure(model, "png"), caption="../report/saebench.rst", category="4 SAEBench",
                   subcategory=model, labels={"model": model, "figure": "saebench"})
            for model in config["models"]
        ] if BENCHED else [],
        [path for path in saebench_report_outputs() if not path.endswith((".md", ".png"))],
    params:
        tables=lambda wc, output: os.path.dirname(output[0]),  # saebench_tables_dir()
        figures=lambda wc, output: os.path.dirname(output[len(stores())]),  # saebench_figures_dir()
        metrics=lambda wc, output: RESULTS.saebench_metrics(),  # one of the outputs
    log:
        RESULTS.log("report", "saebench"),
    benchmark:
        RESULTS.benchmark("report", "saebench")
    shell:
        logged(
            "visae report saebench --results {input} --tables {params.tables:q} --figures {params.figures:q}"
            " --metrics-file {params.metrics:q}"
        )


rule saebench_all:
    input:
        saebench_report_outputs(),
