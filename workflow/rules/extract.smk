# Activations: one job per (model, dataset) records every layer of the model's entry in one
# forward pass. The job's output is the summary `extract.json`, written only on success; the
# stores beside it survive a failed job, so a rerun resumes them shard by shard.


rule extract:
    input:
        unpack(extract_weights),
        data=lambda wc: dataset_files(wc.dataset),
    output:
        RESULTS.extract_marker("{model}", "{dataset}"),
    params:
        layers=lambda wc: " ".join(str(l) for l in config["models"][wc.model]["layers"]),
        weights=lambda wc, input: f"--weights {input.weights}" if "weights" in input.keys() else "",
        max_images=lambda wc: (
            f"--max-images {config['extract']['max_images']}" if config["extract"].get("max_images") else ""
        ),
        out=lambda wc, output: os.path.dirname(output[0]),
        env=lambda wc, threads: threads_env(threads),
        model=lambda wc: entry_json("models", wc.model),
        dataset=lambda wc: entry_json("datasets", wc.dataset),
        tokens=config["extract"]["tokens"],
        dtype=config["extract"]["dtype"],
        batch_size=config["extract"]["batch_size"],
        device=config["extract"]["device"],
        precision=config["extract"]["precision"],
        skip_bad="--skip-bad-images" if config["extract"]["skip_bad_images"] else "",
    log:
        RESULTS.log("extract", "{model}", "{dataset}"),
    benchmark:
        RESULTS.benchmark("extract", "{model}", "{dataset}")
    # CPU jobs run single-threaded: the same numbers on every machine, parallel across jobs
    threads: 1 if config["extract"]["device"] == "cpu" else workflow.cores
    resources:
        gpu=1 if config["extract"]["device"] == "cuda" else 0,
        mem_mb=4000,
    shell:
        logged(
            "{params.env} visae extract --model {params.model:q} --dataset {params.dataset:q}"
            " --layers {params.layers} {params.weights}"
            " --tokens {params.tokens} --dtype {params.dtype} --batch-size {params.batch_size}"
            " {params.max_images} --device {params.device} --precision {params.precision} --out {params.out:q}"
            " {params.skip_bad} --no-progress"
        )


rule extract_all:
    input:
        extract_outputs(),
