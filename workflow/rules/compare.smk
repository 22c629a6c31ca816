# The cross-model comparison: a latent index per compared SAE (and its second seed), a profile per
# SAE (abstraction, invariance, concept probe), a latent matching per pair of models and per model
# against its second seed (the baseline), and CKA / mutual kNN per pair of models. The jobs that run
# the SAE or the model (index, profile, matching) run on compare.device and hold a GPU there.

COMPARE_GPU = 1 if config["compare"]["device"] == "cuda" else 0


rule latent_index:
    input:
        lambda wc: RESULTS.sae_pass_marker(wc.model, wc.dataset, wc.layer, sae_pass(wc.sae)),
    output:
        RESULTS.latent_index_marker("{model}", "{dataset}", "{layer}", "{sae}"),
    params:
        store=lambda wc: RESULTS.store(wc.model, wc.dataset, wc.layer),
        sae=lambda wc: sae_dir(wc.model, wc.dataset, wc.layer, wc.sae),
        out=lambda wc, output: os.path.dirname(output[0]),
        env=lambda wc, threads: threads_env(threads),
        top=config["compare"]["top"],
        max_images=(f"--max-images {config['compare']['max_images']}" if config["compare"]["max_images"] else ""),
        device=config["compare"]["device"],
    log:
        RESULTS.log("latents", "{model}", "{dataset}", "{layer}", "{sae}"),
    benchmark:
        RESULTS.benchmark("latents", "{model}", "{dataset}", "{layer}", "{sae}")
    threads: 1
    resources:
        mem_mb=2000,
        gpu=COMPARE_GPU,
    shell:
        logged(
            "{params.env} visae latents --store {params.store:q} --sae {params.sae:q} --out {params.out:q}"
            " --top {params.top} {params.max_images} --device {params.device}"
        )


rule profile:
    input:
        index=RESULTS.latent_index_marker("{model}", "{dataset}", "{layer}", "{sae}"),
        weights=lambda wc: extract_weights(wc).values(),
        data=lambda wc: dataset_files(wc.dataset),
        domain=lambda wc: dataset_files(config["compare"]["domain"]) if config["compare"]["domain"] else [],
    output:
        RESULTS.profile_marker("{model}", "{dataset}", "{layer}", "{sae}"),
    params:
        index=lambda wc, input: os.path.dirname(input.index),
        out=lambda wc, output: os.path.dirname(output[0]),
        env=lambda wc, threads: threads_env(threads),
        weights=lambda wc: model_weights(wc.model),
        model=lambda wc: entry_json("models", wc.model),
        domain=domain_flags(),
        hierarchy=json.dumps(config["compare"]["hierarchy"] or {}, sort_keys=True),
        shifts=" ".join(config["compare"]["shifts"]),
        latents=config["compare"]["invariance_latents"],
        seed=config["compare"]["seed"],
        device=config["compare"]["device"],
    log:
        RESULTS.log("profile", "{model}", "{dataset}", "{layer}", "{sae}"),
    benchmark:
        RESULTS.benchmark("profile", "{model}", "{dataset}", "{layer}", "{sae}")
    threads: 1
    resources:
        mem_mb=2000,
        gpu=COMPARE_GPU,
    shell:
        logged(
            "{params.env} visae profile --index {params.index:q} --out {params.out:q} --model {params.model:q}"
            " {params.weights}"
            " --hierarchy-json {params.hierarchy:q} --shifts {params.shifts} --invariance-latents {params.latents}"
            " --seed {params.seed} --device {params.device} {params.domain}"
        )


rule compare:
    input:
        a=RESULTS.latent_index_marker("{model_a}", "{dataset}", "{layer_a}", "{sae_a}"),
        b=RESULTS.latent_index_marker("{model_b}", "{dataset}", "{layer_b}", "{sae_b}"),
        data=lambda wc: dataset_files(wc.dataset),
    output:
        RESULTS.comparison_marker("{model_a}", "{layer_a}", "{sae_a}", "{model_b}", "{layer_b}", "{sae_b}", "{dataset}"),
    params:
        a=lambda wc, input: os.path.dirname(input.a),
        b=lambda wc, input: os.path.dirname(input.b),
        out=lambda wc, output: os.path.dirname(output[0]),
        env=lambda wc, threads: threads_env(threads),
        threshold=config["compare"]["match_threshold"],
        seed=config["compare"]["seed"],
        device=config["compare"]["device"],
    log:
        RESULTS.log("compare", "{model_a}__{model_b}", "{dataset}", "{layer_a}__{layer_b}", "{sae_a}__{sae_b}"),
    benchmark:
        RESULTS.benchmark("compare", "{model_a}__{model_b}", "{dataset}", "{layer_a}__{layer_b}", "{sae_a}__{sae_b}")
    threads: 1
    resources:
        mem_mb=2000,
        gpu=COMPARE_GPU,
    shell:
        logged(
            "{params.env} visae compare --a {params.a:q} --b {params.b:q} --out {params.out:q}"
            " --threshold {params.threshold} --seed {params.seed} --device {params.device}"
        )


rule similarity:
    input:
        a=lambda wc: RESULTS.extract_marker(wc.model_a, wc.dataset),
        b=lambda wc: RESULTS.extract_marker(wc.model_b, wc.dataset),
    output:
        RESULTS.similarity_marker("{model_a}", "{model_b}", "{dataset}"),
    params:
        a=lambda wc: [RESULTS.store(wc.model_a, wc.dataset, layer) for layer in layer_names(wc.model_a)],
        b=lambda wc: [RESULTS.store(wc.model_b, wc.dataset, layer) for layer in layer_names(wc.model_b)],
        out=lambda wc, output: os.path.dirname(output[0]),
        env=lambda wc, threads: threads_env(threads),
        knn=config["compare"]["knn"],
        seed=config["compare"]["seed"],
        heldout=config["train"]["heldout"],
        split_seed=config["train"]["split_seed"],
        max_images=(f"--max-images {config['compare']['max_images']}" if config["compare"]["max_images"] else ""),
    log:
        RESULTS.log("similarity", "{model_a}__{model_b}", "{dataset}"),
    benchmark:
        RESULTS.benchmark("similarity", "{model_a}__{model_b}", "{dataset}")
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        logged(
            "{params.env} visae similarity --a {params.a:q} --b {params.b:q} --out {params.out:q} --knn {params.knn}"
            " --seed {params.seed} --heldout {params.heldout} --split-seed {params.split_seed} {params.max_images}"
        )


rule compare_report:
    input:
        profiles=profile_outputs(),
        matchings=comparison_outputs() + comparison_outputs(seed_baseline=True),
        similarities=similarity_outputs(),
        indexes=[RESULTS.latent_index_marker(m, COMPARE_DATASET, l, s) for m, l in compare_stores() for s in COMPARED],
    output:
        # one caption per table, in COMPARISON_TABLES' order (params.figures counts them)
        report(RESULTS.comparison_table("profiles", "md"), caption="../report/compare_profiles.rst",
               category="2 Comparison", subcategory="Tables", labels={"table": "Table 2a: profiles"}),
        report(RESULTS.comparison_table("matching", "md"), caption="../report/compare_matching.rst",
               category="2 Comparison", subcategory="Tables", labels={"table": "Table 2b: matching"}),
        report(RESULTS.comparison_table("similarity", "md"), caption="../report/compare_similarity.rst",
               category="2 Comparison", subcategory="Tables", labels={"table": "Table 2c: similarity"}),
        [report(RESULTS.comparison_figure(kind, model, "png"), caption=f"../report/{kind}.rst",
                category="2 Comparison", subcategory=model, labels={"model": model, "figure": kind})
         for model in config["models"] for kind in MODEL_COMPARISON_FIGURES if kind != "exemplars"],
        [report(RESULTS.comparison_figure("exemplars", model, "png"), caption="../report/exemplars_model.rst",
                category="2 Comparison", subcategory=model, labels={"model": model, "figure": "exemplars"})
         for model in config["models"]],
        [report(RESULTS.comparison_figure(kind, f"{a}__{b}", "png"), caption=f"../report/{kind}.rst",
                category="2 Comparison", subcategory=f"{a} vs {b}", labels={"pair": f"{a} vs {b}", "figure": kind})
         for a, b in model_pairs() for kind in PAIR_COMPARISON_FIGURES],
        compare_report_outputs(table_formats=[f for f in TABLE_FORMATS if f != "md"],
                               figure_formats=[f for f in FIGURE_FORMATS if f != "png"]),
    params:
        tables=lambda wc, output: os.path.dirname(output[0]),  # comparison_tables_dir()
        figures=lambda wc, output: os.path.dirname(output[len(COMPARISON_TABLES)]),  # comparison_figures_dir()
    log:
        RESULTS.log("report", "compare"),
    benchmark:
        RESULTS.benchmark("report", "compare")
    shell:
        logged(
            "visae report compare --profiles {input.profiles:q} --matchings {input.matchings:q}"
            " --similarities {input.similarities:q} --tables {params.tables:q} --figures {params.figures:q}"
        )


rule compare_all:
    input:
        compare_report_outputs(),
        intervened_indexes(),
        saebench_indexes(),
