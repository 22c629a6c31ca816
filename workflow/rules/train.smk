# SAEs: one job per (store, pass). Every SAE of a pass trains from one streamed read of the
# store; by default each SAE is its own pass, so changing one SAE re-plans only that SAE.


rule train:
    input:
        rules.extract.output,
    output:
        RESULTS.sae_pass_marker("{model}", "{dataset}", "{layer}", "{pass_}"),
    params:
        grid=lambda wc: json.dumps([sae_entry(sae) for sae in pass_members(wc.pass_)], sort_keys=True),
        store=lambda wc: RESULTS.store(wc.model, wc.dataset, wc.layer),
        out=lambda wc, output: os.path.dirname(output[0]),
        checkpoint=lambda wc: (
            f"--checkpoint-every {config['train']['checkpoint_every']}"
            if config["train"].get("checkpoint_every") else ""
        ),
        env=lambda wc, threads: threads_env(threads),
        heldout=config["train"]["heldout"],
        seed=config["train"]["seed"],
        split_seed=config["train"]["split_seed"],
        token_kind=config["train"]["token_kind"],
        device=config["train"]["device"],
    log:
        RESULTS.log("train", "{model}", "{dataset}", "{layer}", "{pass_}"),
    benchmark:
        RESULTS.benchmark("train", "{model}", "{dataset}", "{layer}", "{pass_}")
    threads: 1 if config["train"]["device"] == "cpu" else workflow.cores
    resources:
        gpu=1 if config["train"]["device"] == "cuda" else 0,
        mem_mb=4000,
    shell:
        logged(
            "{params.env} visae train --store {params.store:q} --grid-json {params.grid:q}"
            " --out {params.out:q} --heldout {params.heldout} --seed {params.seed} --split-seed {params.split_seed}"
            " --token-kind {params.token_kind} --device {params.device} --restart-stale"
            " {params.checkpoint}"
        )


rule train_all:
    input:
        pass_outputs(),
