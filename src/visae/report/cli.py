"""`visae report tables|figures|compare|interventions`: the SAE table, per-model figures, the comparison's and
the interventions' reports (see visae.report and its modules for file names)."""

from __future__ import annotations

import time
from pathlib import Path

from visae.atomic import clean_stale_temps, write_json
from visae.layout import RUN_MARKER
from visae.provenance import provenance


def _config(args, command: str) -> dict:
    cfg = {"command": f"report {command}", "metrics": [str(p) for p in args.metrics]}
    for name in ("latents", "logs"):
        if getattr(args, name, None) is not None:
            cfg[name] = [str(p) for p in getattr(args, name)]
    return cfg


def cmd_report_tables(args) -> int:
    from visae.report.collect import collect_rows
    from visae.report.tables import write_tables

    started = time.time()
    clean_stale_temps(args.out)
    rows = collect_rows(args.metrics)
    paths = write_tables(rows, args.out)
    write_json(Path(args.out) / RUN_MARKER, provenance(_config(args, "tables"), seeds={}, started=started))
    print(f"{len(rows)} SAE(s) -> {', '.join(str(p) for p in paths.values())}")
    return 0


def cmd_report_figures(args) -> int:
    from visae.report.collect import collect_rows, load_log, match_latents
    from visae.report.figures import write_figures

    started = time.time()
    clean_stale_temps(args.out)
    rows = collect_rows(args.metrics)
    freqs = match_latents(rows, args.latents)
    logs = [load_log(p) for p in (args.logs or [])]
    paths = write_figures(rows, args.out, freqs=freqs, logs=logs)
    write_json(Path(args.out) / RUN_MARKER, provenance(_config(args, "figures"), seeds={}, started=started))
    print(f"{len(paths)} figure file(s) -> {args.out}")
    return 0


def cmd_report_compare(args) -> int:
    from visae.report.comparison import write_comparison

    started = time.time()
    for out in (args.tables, args.figures):
        clean_stale_temps(out)
    paths = write_comparison(args.profiles, args.matchings, args.similarities, args.tables, args.figures)
    config = {"command": "report compare", **{k: [str(p) for p in getattr(args, k)]
                                              for k in ("profiles", "matchings", "similarities")}}
    write_json(Path(args.figures) / RUN_MARKER, provenance(config, seeds={}, started=started))
    print(f"{len(paths)} comparison table/figure file(s) -> {args.tables}, {args.figures}")
    return 0


def cmd_report_interventions(args) -> int:
    from visae.report.interventions import write_interventions

    started = time.time()
    for out in (args.tables, args.figures):
        clean_stale_temps(out)
    paths = write_interventions(args.results, args.tables, args.figures)
    config = {"command": "report interventions", "results": [str(p) for p in args.results]}
    write_json(Path(args.figures) / RUN_MARKER, provenance(config, seeds={}, started=started))
    print(f"{len(args.results)} intervention(s) -> {len(paths)} table/figure file(s) in {args.tables}, {args.figures}")
    return 0


# Report parts with their own module: each defines `add_arguments(parser)` and `run(args) -> int`.
PARTS = {
    "saebench": ("visae.report.saebench", "per store: saebench/tables/<model>__<dataset>__<layer>.*, "
                                          + "metrics/saebench.json, saebench_<m> figures"),
    "browser": ("visae.report.browser", "the static latent browser (results/browser/index.html, from file://)"),
    "readme": ("visae.report.summary", "results/README.md: what was run, the headline numbers, links to everything"),
}


def _part(name: str):
    import importlib

    return importlib.import_module(PARTS[name][0])


def cmd_report_saebench(args) -> int:
    return _part("saebench").run(args)


def cmd_report_browser(args) -> int:
    return _part("browser").run(args)


def cmd_report_readme(args) -> int:
    return _part("readme").run(args)


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("report", description=__doc__)
    sub = p.add_subparsers(dest="report_command", metavar="<what>", required=True)
    t = sub.add_parser("tables", help="saes.md / saes.csv / saes.tex: one row per evaluated SAE")
    t.add_argument("--metrics", nargs="+", required=True, metavar="METRICS_JSON",
                   help="metrics.json files written by `visae evaluate`")
    t.add_argument("--out", required=True, help="output folder")
    t.set_defaults(func=cmd_report_tables)
    f = sub.add_parser("figures", help="per model: frontier_<m>, latent_freq_<m>, training_<m>; frontier_all "
                                       "(.png and .pdf)")
    f.add_argument("--metrics", nargs="+", required=True, metavar="METRICS_JSON",
                   help="metrics.json files written by `visae evaluate`")
    f.add_argument("--latents", nargs="*", default=None, metavar="LATENTS_CSV",
                   help="latents.csv files beside those metrics.json (else their log10_freq_hist is drawn)")
    f.add_argument("--logs", nargs="*", default=None, metavar="LOG_CSV",
                   help="SAE training log.csv files (beside each checkpoint's config.json)")
    f.add_argument("--out", required=True, help="output folder")
    f.set_defaults(func=cmd_report_figures)
    c = sub.add_parser("compare", help="profiles / matching / similarity tables; abstraction_<m>, invariance_<m>, "
                                       "exemplars_<m>, matching_<a>__<b>, exemplars_<a>__<b> figures")
    c.add_argument("--profiles", nargs="*", default=[], metavar="PROFILE_JSON", help="`visae profile` outputs")
    c.add_argument("--matchings", nargs="*", default=[], metavar="MATCHING_JSON", help="`visae compare` outputs")
    c.add_argument("--similarities", nargs="*", default=[], metavar="SIMILARITY_JSON",
                   help="`visae similarity` outputs")
    c.add_argument("--tables", required=True, help="output folder of the tables")
    c.add_argument("--figures", required=True, help="output folder of the figures")
    c.set_defaults(func=cmd_report_compare)
    i = sub.add_parser("interventions", help="per task: <task>.md/csv/tex/json; dose_<task>_<m>, example_<task>_<m> "
                                             "figures")
    i.add_argument("--results", nargs="+", required=True, metavar="INTERVENTION_JSON",
                   help="intervention.json files written by `visae intervene`")
    i.add_argument("--tables", required=True, help="output folder of the tables")
    i.add_argument("--figures", required=True, help="output folder of the figures")
    i.set_defaults(func=cmd_report_interventions)
    for name, (_, help_line) in PARTS.items():
        part = sub.add_parser(name, help=help_line)
        _part(name).add_arguments(part)
        part.set_defaults(func=globals()[f"cmd_report_{name}"])
