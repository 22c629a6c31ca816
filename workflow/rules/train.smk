# SAEs: one job per (store, pass). Every SAE of a pass trains from one streamed read of the
# store; by default each SAE is its own pass, so changing one SAE re-plans only that SAE.
# An SAE trained elsewhere (an `import:` entry: a pass of its own) is written by `visae sae
# import` instead, into the same checkpoint folder with the same pass marker, so every later rule
# takes it as it takes a trained one. The two rules' wildcard constraints split the pass names.
from visae.sae.config import import_files, import_flags, is_imported, pass_pattern

IMPORTED = sorted(sae for sae, entry in config["saes"].items() if is_imported(entry))


rule train:
    wildcard_constraints:
        pass_=pass_pattern(IMPORTED, trained=True),
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
        precision=config["train"]["precision"],
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
            " --token-kind {params.token_kind} --device {params.device} --precision {params.precision} --restart-stale"
            " {params.checkpoint}"
        )


rule import_sae:
    wildcard_constraints:
        pass_=pass_pattern(IMPORTED, trained=False),
    input:
        rules.extract.output,
        lambda wc: import_files(config["saes"][wc.pass_], wc.model),
    output:
        RESULTS.sae_pass_marker("{model}", "{dataset}", "{layer}", "{pass_}"),
    params:
        flags=lambda wc: import_flags(wc.pass_, config["saes"][wc.pass_], wc.model),
        store=lambda wc: RESULTS.store(wc.model, wc.dataset, wc.layer),
        out=lambda wc: RESULTS.sae(wc.model, wc.dataset, wc.layer, wc.pass_, wc.pass_),
        env=lambda wc, threads: threads_env(threads),
        heldout=config["train"]["heldout"],
        split_seed=config["train"]["split_seed"],
        token_kind=config["train"]["token_kind"],
    log:
        RESULTS.log("train", "{model}", "{dataset}", "{layer}", "{pass_}"),
    benchmark:
        RESULTS.benchmark("train", "{model}", "{dataset}", "{layer}", "{pass_}")
    threads: 1
    resources:
        mem_mb=4000,
    shell:
        logged(
            "{params.env} visae sae import {params.flags} --store {params.store:q} --out {params.out:q}"
            " --marker {output:q} --heldout {params.heldout} --split-seed {params.split_seed}"
            " --token-kind {params.token_kind}"
        )


rule train_all:
    input:
        pass_outputs(),
