# SAEs: one job per (store, pass). Every SAE of a pass trains from one streamed read of the
# store; by default each SAE is its own pass, so changing one SAE re-plans only that SAE.


rule train:
    input:
        f"{RESULTS}/activations/{{model}}/{{dataset}}/extract.json",
    output:
        f"{RESULTS}/saes/{{model}}/{{dataset}}/{{layer}}/{{pass_}}/provenance.json",
    params:
        grid=lambda wc: json.dumps([sae_entry(sae) for sae in pass_members(wc.pass_)], sort_keys=True),
        store=lambda wc: f"{RESULTS}/activations/{wc.model}/{wc.dataset}/{wc.layer}",
        out=lambda wc: f"{RESULTS}/saes/{wc.model}/{wc.dataset}/{wc.layer}/{wc.pass_}",
        checkpoint=lambda wc: (
            f"--checkpoint-every {config['train']['checkpoint_every']}"
            if config["train"].get("checkpoint_every") else ""
        ),
        env=lambda wc, threads: threads_env(threads),
        heldout=config["train"]["heldout"],
        seed=config["train"]["seed"],
        token_kind=config["train"]["token_kind"],
        device=config["train"]["device"],
    log:
        f"{RESULTS}/logs/train/{{model}}/{{dataset}}/{{layer}}/{{pass_}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/train/{{model}}/{{dataset}}/{{layer}}/{{pass_}}.tsv"
    threads: 1 if config["train"]["device"] == "cpu" else workflow.cores
    resources:
        gpu=1 if config["train"]["device"] == "cuda" else 0,
        mem_mb=4000,
    shell:
        "{params.env} visae train --store {params.store:q} --grid-json {params.grid:q}"
        " --out {params.out:q} --heldout {params.heldout} --seed {params.seed}"
        " --token-kind {params.token_kind} --device {params.device} --restart-stale"
        " {params.checkpoint} > {log:q} 2>&1 || (tail -n 1 {log:q} >&2; exit 1)"


rule train_all:
    input:
        pass_outputs(),
