# Metrics of every SAE on the held-out images of its store.


rule evaluate:
    input:
        lambda wc: RESULTS.sae_pass_marker(wc.model, wc.dataset, wc.layer, sae_pass(wc.sae)),
    output:
        metrics=RESULTS.metrics("{model}", "{dataset}", "{layer}", "{sae}"),
        latents=RESULTS.latents("{model}", "{dataset}", "{layer}", "{sae}"),
    params:
        store=lambda wc: RESULTS.store(wc.model, wc.dataset, wc.layer),
        sae=lambda wc: sae_dir(wc.model, wc.dataset, wc.layer, wc.sae),
        out=lambda wc, output: os.path.dirname(output.metrics),
        env=lambda wc, threads: threads_env(threads),
        batch_size=config["evaluate"]["batch_size"],
    log:
        RESULTS.log("evaluate", "{model}", "{dataset}", "{layer}", "{sae}"),
    benchmark:
        RESULTS.benchmark("evaluate", "{model}", "{dataset}", "{layer}", "{sae}")
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        logged(
            "{params.env} visae evaluate --store {params.store:q} --sae {params.sae:q} --out {params.out:q}"
            " --batch-size {params.batch_size}"
        )


rule evaluate_all:
    input:
        evaluate_outputs(),
