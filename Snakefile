# Entry point. The default target lives here: an included file's default_target is lost.
include: "workflow/Snakefile"


rule all:
    default_target: True
    input:
        all_outputs,
