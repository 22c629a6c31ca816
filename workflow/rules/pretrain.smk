# The demo's own backbones: tiny timm ViTs trained by `visae pretrain` with different objectives.


rule pretrain:
    input:
        lambda wc: dataset_files(config["models"][wc.model]["pretrain"]["dataset"]),
    output:
        RESULTS.pretrain_model("{model}"),
    params:
        model=lambda wc: pretrain_json(wc.model),
        data=lambda wc: pretrain_data(wc.model),
        out=lambda wc, output: os.path.dirname(output[0]),
        env=lambda wc, threads: threads_env(threads),
    log:
        RESULTS.log("pretrain", "{model}"),
    benchmark:
        RESULTS.benchmark("pretrain", "{model}")
    threads: 1  # two single-threaded pretrainings beat two that share both cores
    resources:
        mem_mb=2000,
    shell:
        logged(
            "{params.env} visae pretrain --model {params.model:q} {params.data} --threads {threads}"
            " --out {params.out:q} --quiet"
        )


rule pretrain_all:
    input:
        pretrain_outputs(),
