# Result tables and figures; `snakemake --report results/report.html` embeds them.


rule tables:
    input:
        evaluate_outputs(),
    output:
        md=report(f"{RESULTS}/tables/saes.md", category="Tables", labels={"table": "SAEs (Markdown)"}),
        csv=report(f"{RESULTS}/tables/saes.csv", category="Tables", labels={"table": "SAEs (CSV)"}),
        tex=f"{RESULTS}/tables/saes.tex",
        json=f"{RESULTS}/tables/saes.json",
    params:
        out=lambda wc, output: os.path.dirname(output.md),
    log:
        f"{RESULTS}/logs/report/tables.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/tables.tsv"
    shell:
        "visae report tables --metrics {input} --out {params.out:q} > {log:q} 2>&1 || (tail -n 1 {log:q} >&2; exit 1)"


rule figures:
    input:
        metrics=evaluate_outputs(),
        latents=[m.replace("metrics.json", "latents.csv") for m in evaluate_outputs()],
        passes=pass_outputs(),  # the training logs below are written by these jobs
    output:
        [
            report(
                f"{RESULTS}/figures/{kind}_{model}.png",
                category="Figures",
                subcategory=model,
                labels={"model": model, "figure": kind},
            )
            for model in config["models"]
            for kind in ("frontier", "latent_freq", "training")
        ],
        [
            f"{RESULTS}/figures/{kind}_{model}.pdf"
            for model in config["models"]
            for kind in ("frontier", "latent_freq", "training")
        ],
    params:
        logs=sae_logs(),
        out=lambda wc, output: os.path.dirname(output[0]),
    log:
        f"{RESULTS}/logs/report/figures.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/figures.tsv"
    shell:
        "visae report figures --metrics {input.metrics} --latents {input.latents}"
        " --logs {params.logs} --out {params.out:q} > {log:q} 2>&1 || (tail -n 1 {log:q} >&2; exit 1)"


rule report_all:
    input:
        report_outputs(),
