# Demo data: Fashion-MNIST copied from Debian's dataset-fashion-mnist package, or downloaded
# from the official release, each file checked against its published MD5 sum.


rule fetch_fashion_mnist:
    output:
        [f"{FASHION_MNIST_ROOT}/{name}" for name in FASHION_MNIST_FILES],
    params:
        out=lambda wc, output: os.path.dirname(output[0]),
    log:
        RESULTS.log("data", "fashion-mnist"),
    benchmark:
        RESULTS.benchmark("data", "fashion-mnist")
    shell:
        logged("visae fetch fashion-mnist --out {params.out:q}")
