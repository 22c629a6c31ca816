# Result tables and figures; `snakemake --report results/report.html` embeds them, each with the
# caption under workflow/report/.


rule tables:
    input:
        evaluate_outputs(),
    output:
        md=report(RESULTS.table("saes", "md"), caption="../report/saes_md.rst", category="1 SAEs",
                  subcategory="Tables", labels={"table": "Table 1: SAE metrics", "format": "Markdown"}),
        csv=report(RESULTS.table("saes", "csv"), caption="../report/saes_csv.rst", category="1 SAEs",
                   subcategory="Tables", labels={"table": "Table 1: SAE metrics", "format": "CSV"}),
        tex=RESULTS.table("saes", "tex"),
        json=RESULTS.table("saes", "json"),
    params:
        out=lambda wc, output: os.path.dirname(output.md),
    log:
        RESULTS.log("report", "tables"),
    benchmark:
        RESULTS.benchmark("report", "tables")
    shell:
        logged("visae report tables --metrics {input} --out {params.out:q}")


rule figures:
    input:
        metrics=evaluate_outputs(),
        latents=evaluate_outputs("latents"),
        passes=pass_outputs(),  # the training logs below are written by these jobs
    output:
        [
            report(
                RESULTS.figure(kind, model, "png"),
                caption=f"../report/{kind}.rst",
                category="1 SAEs",
                subcategory=model,
                labels={"model": model, "figure": kind},
            )
            for model in config["models"]
            for kind in FIGURE_KINDS
        ],
        [
            report(RESULTS.figure("frontier", ALL_MODELS, "png"), caption="../report/frontier_all.rst", category="1 SAEs",
                   subcategory="all models", labels={"model": "all models", "figure": "frontier"})
        ],
        figure_outputs("pdf"),
    params:
        logs=sae_logs(),
        out=lambda wc, output: os.path.dirname(output[0]),
    log:
        RESULTS.log("report", "figures"),
    benchmark:
        RESULTS.benchmark("report", "figures")
    shell:
        logged(
            "visae report figures --metrics {input.metrics} --latents {input.latents}"
            " --logs {params.logs} --out {params.out:q}"
        )


rule report_all:
    input:
        report_outputs(),


# results/README.md: what was run, the headline numbers beside their baselines, the numbered tables,
# links to every figure and to the latent browser.
rule readme:
    input:
        report_outputs(),
        compare_report_outputs(),
        intervene_report_outputs(),
        saebench_report_outputs(),
        extract_outputs(),
        pass_outputs(),
        browser_outputs(),
    output:
        report(RESULTS.readme(), caption="../report/readme.rst", category="5 Summary", labels={"page": "README"}),
    params:
        results=lambda wc, output: os.path.dirname(output[0]) or ".",  # the results folder holds README.md
    log:
        RESULTS.log("report", "readme"),
    benchmark:
        RESULTS.benchmark("report", "readme")
    shell:
        logged("visae report readme --results-dir {params.results:q} --out {output:q}")


# The latent browser: a static site under results/browser/, opened from file:// (index.html last).
rule browser:
    input:
        indexes=browser_indexes(),
        matchings=comparison_outputs() + comparison_outputs(seed_baseline=True),
        profiles=profile_outputs(),
        interventions=intervention_outputs(),
        saebench=[path for path in saebench_outputs() if f"/{COMPARE_DATASET}/" in path],
        data=dataset_files(COMPARE_DATASET),
    output:
        RESULTS.browser_index(),
    params:
        indexes=lambda wc, input: [os.path.dirname(path) for path in input.indexes],
        dataset=entry_json("datasets", COMPARE_DATASET),
        out=lambda wc, output: os.path.dirname(output[0]),  # browser(): index.html marks it done
        env=lambda wc, threads: threads_env(threads),
    log:
        RESULTS.log("report", "browser"),
    benchmark:
        RESULTS.benchmark("report", "browser")
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        logged(
            "{params.env} visae report browser --indexes {params.indexes:q} --matchings {input.matchings:q}"
            " --profiles {input.profiles:q} --interventions {input.interventions:q} --saebench {input.saebench:q}"
            " --datasets {params.dataset:q} --out {params.out:q}"
        )
