"""`visae report`: result tables and figures, the DAG's last stage.

Inputs are explicit lists of files (Snakemake passes them):
- `--metrics`: `metrics.json` files written by `visae evaluate`;
- `--latents`: `latents.csv` files written by `visae evaluate`;
- `--logs`: `log.csv` files written by `visae train` (in an SAE checkpoint folder, beside `config.json`).

Each evaluation is one row, identified by (model, dataset, layer, sae). Every input names itself
(visae.layout.Identity): a metrics file by its `identity` block (k and λ come from its `entry`), a
latents file by its identity columns (it belongs to the metrics file of the same identity and store
hash), a training log by the `identity` of the checkpoint's `config.json` beside it. Nothing is
guessed from a path; an input without identity is an error that says which file.

Outputs (stable names, embedded in the Snakemake report):
- `visae report tables --metrics ... --out DIR`:
  - `DIR/saes.csv`: every row, full float precision (the machine-readable table);
  - `DIR/saes.md`: the same rows, rounded, as a Markdown (pipe) table;
  - `DIR/saes.tex`: the same rows, rounded, as a LaTeX booktabs tabular;
  - `DIR/saes.json`: the numbers keyed by `model/dataset/layer_L/sae` (what `dvc metrics` reads);
  - `DIR/provenance.json`.
- `visae report figures --metrics ... [--latents ...] [--logs ...] --out DIR`, per model `<m>`
  (the model name with characters outside `[A-Za-z0-9._-]` replaced by `_`):
  - `DIR/frontier_<m>.png`, `.pdf`: NMSE against L0 (log x), one point per SAE, coloured by architecture;
  - `DIR/latent_freq_<m>.png`, `.pdf`: histograms of log10 latent firing frequency, one panel per SAE
    (from `latents.csv` where given, else from the metrics' `log10_freq_hist`);
  - `DIR/training_<m>.png`, `.pdf`: MSE and L0 against tokens seen, one line per SAE (only with `--logs`);
  - `DIR/frontier_all.png`, `.pdf`: every model's SAEs on one frontier (colour: model, marker:
    architecture); a model named `all` is refused;
  - `DIR/provenance.json`.
Rows are sorted by (model, dataset, layer, sae); tables and figures are byte-identical across reruns
of the same inputs (PNG/PDF without timestamps; `provenance.json` records the run, so it differs).
"""

# Submodules load on first use, so `visae --help` does not import seaborn/matplotlib.
_EXPORTS = {"Row": "collect", "collect_rows": "collect", "load_latents": "collect", "load_log": "collect",
            "match_latents": "collect", "rows_frame": "tables", "write_tables": "tables",
            "write_figures": "figures"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"visae.report.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'visae.report' has no attribute {name!r}")
