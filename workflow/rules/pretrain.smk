# The demo's own backbones: tiny timm ViTs trained by `visae pretrain` with different objectives.


rule pretrain:
    input:
        lambda wc: dataset_files(config["models"][wc.model]["pretrain"]["dataset"]),
    output:
        f"{RESULTS}/pretrain/{{model}}/model.safetensors",
    params:
        args=pretrain_args,
        out=lambda wc: f"{RESULTS}/pretrain/{wc.model}",
        env=lambda wc, threads: threads_env(threads),
    log:
        f"{RESULTS}/logs/pretrain/{{model}}.log",
    benchmark:
        f"{RESULTS}/benchmarks/pretrain/{{model}}.tsv"
    threads: 1  # two single-threaded pretrainings beat two that share both cores
    resources:
        mem_mb=2000,
    shell:
        "{params.env} visae pretrain {params.args} --out {params.out:q} --quiet"
        " > {log:q} 2>&1 || (tail -n 1 {log:q} >&2; exit 1)"


rule pretrain_all:
    input:
        pretrain_outputs(),
