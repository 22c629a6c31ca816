# Metrics of every SAE on the held-out images of its store.


rule evaluate:
    input:
        lambda wc: f"{RESULTS}/saes/{wc.model}/{wc.dataset}/{wc.layer}/{sae_pass(wc.sae)}/provenance.json",
    output:
        metrics=f"{RESULTS}/evaluate/{{model}}/{{dataset}}/{{layer}}/{{sae}}/metrics.json",
        latents=f"{RESULTS}/evaluate/{{model}}/{{dataset}}/{{layer}}/{{sae}}/latents.csv",
    params:
        store=lambda wc: f"{RESULTS}/activations/{wc.model}/{wc.dataset}/{wc.layer}",
        sae=lambda wc: sae_dir(wc.model, wc.dataset, wc.layer, wc.sae),
        out=lambda wc: f"{RESULTS}/evaluate/{wc.model}/{wc.dataset}/{wc.layer}/{wc.sae}",
        env=lambda wc, threads: threads_env(threads),
        batch_size=config["evaluate"]["batch_size"],
    log:
        f"{RESULTS}/logs/evaluate/{{model}}/{{dataset}}/{{layer}}/{{sae}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/evaluate/{{model}}/{{dataset}}/{{layer}}/{{sae}}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
    shell:
        "{params.env} visae evaluate --store {params.store:q} --sae {params.sae:q} --out {params.out:q}"
        " --batch-size {params.batch_size} > {log:q} 2>&1 || (tail -n 1 {log:q} >&2; exit 1)"


rule evaluate_all:
    input:
        evaluate_outputs(),
