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
