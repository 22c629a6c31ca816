"""Concept probe: how well single latents, and small sets of them, detect each class.

saev's semprobe asks whether some latent fires on exactly one class's images; here, per class,
the F1 of the best single latent and of the best `top` latents combined, each against latents
of matched firing frequency picked at random and put through the same selection, so a high F1
means more than "a latent that fires about this often". Latents and thresholds are chosen on one
seeded half of the images and the F1 is reported on the other half, so it is not overfit.

Everything works on the sparse image-level activation matrix [n, h]: no dense [n, h] matrix is
built; the largest arrays are [h, C] (per latent and class) and [thresholds, block, C] blocks.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from visae.errors import VisaeError

BLOCK_ENTRIES = 4_000_000  # bounds a sweep block's [thresholds + 1, latents, classes] count array


def concept_probe(acts, labels, n_classes: int, *, seed: int = 0, n_thresholds: int = 20, top: int = 5,
                  n_matched: int = 10) -> dict:
    """Per class, the best single latent and the best `top` latents combined, with baselines.

    acts: scipy.sparse [n_images, h] image-level activations (0 = does not fire); labels: int [n].

    - Split: per class, a seeded half of its images selects, the other half evaluates.
    - Single latent: predicts class c where its activation > f * (its max on the selection
      half), f in {0, 1/T, ..., (T-1)/T} (f = 0: fires at all). The (latent, f) of best
      selection F1 is reported with its F1 on the evaluation half.
    - Top set: the `top` latents of best selection F1 for c, ranked; the combined score of its
      first k is the sum of their activations each divided by its selection max, thresholded the
      same way (f x the score's selection max). k (`top_used`) and f are those of best
      selection F1, so a class that one latent detects is not diluted by four weaker ones.
    - Baseline: each chosen latent is replaced by a random latent among the `n_matched` nearest
      to it in selection firing frequency (never one of the class's own chosen latents), then
      the same threshold selection on the same halves.

    Returns {"rows": one JSON-able dict per class, "summary": means over the scored classes,
    "settings"}. A class with no images, or with one (so the evaluation half lacks it), is
    reported with its status and None in place of its numbers.
    """
    acts, labels = _check_inputs(acts, labels, n_classes, n_thresholds, top, n_matched)
    h = acts.shape[1]
    rng = np.random.default_rng(seed)
    select, evaluate = stratified_halves(labels, rng)
    sel = acts[select].tocsc()
    sel_labels, ev_labels = labels[select], labels[evaluate]
    n_sel = np.bincount(sel_labels, minlength=n_classes)
    n_ev = np.bincount(ev_labels, minlength=n_classes)
    scale = _column_max(sel)
    frequency = np.diff(sel.indptr) / max(len(select), 1)

    best_f1, best_step = best_thresholds(sel, scale, sel_labels, n_classes, n_thresholds)
    chosen = _top_latents(best_f1, top)  # [top, C], best first
    matched = matched_latents(chosen, frequency, n_matched, rng)  # [top, C]

    ev = acts[evaluate]
    classes = np.arange(n_classes)
    results = {}
    for name, latents in (("", chosen), ("baseline_", matched)):
        single = latents[0]
        step = best_step[single, classes]
        thresholds = step / n_thresholds * scale[single]
        results[name + "f1_single_select"] = best_f1[single, classes].astype(np.float64)
        results[name + "f1_single"] = _f1_at(ev[:, single].tocsc(), thresholds, ev_labels, n_ev)
        results[name + "threshold"] = thresholds
        used, f1_sel, thresholds = _best_prefix(sel, latents, scale, sel_labels, n_thresholds)
        results[name + "top_used"] = used
        results[name + "f1_top_select"] = f1_sel
        weights = _combination(latents, scale, used, h)
        results[name + "f1_top"] = _f1_at((ev @ weights).tocsc(), thresholds, ev_labels, n_ev)

    rows = [_row(c, n_sel[c], n_ev[c], chosen[:, c], matched[:, c], results) for c in range(n_classes)]
    return {"rows": rows, "summary": _summary(rows), "settings": {
        "seed": seed, "n_thresholds": n_thresholds, "top": top, "n_matched": n_matched,
        "n_select": len(select), "n_evaluate": len(evaluate), "n_latents": h,
        "threshold_rule": "activation > f x the latent's selection-half max, f = 0, 1/T, ..., (T-1)/T",
        "top_rule": "sum of the first k of the top latents' activations, each divided by its selection-half max; "
                    "k and the threshold of best selection F1",
        "split": "per class, a seeded half selects latents and thresholds; the other half reports F1",
    }}


def _check_inputs(acts, labels, n_classes, n_thresholds, top, n_matched):
    if not sparse.issparse(acts) or acts.ndim != 2:
        raise VisaeError(f"concept probe needs a scipy.sparse [images, latents] activation matrix; got "
                         f"{type(acts).__name__}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise VisaeError(f"concept probe labels must be a 1-D integer array; got {labels.dtype} {labels.shape}")
    if acts.shape[0] != len(labels):
        raise VisaeError(f"concept probe: activations have {acts.shape[0]} images but labels have {len(labels)}; "
                         "pass the labels of the same images, in the same order")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise VisaeError(f"concept probe labels must lie in 0..{n_classes - 1}; got {labels.min()}..{labels.max()}")
    for name, value, high in (("n_thresholds", n_thresholds, 1000), ("top", top, 100), ("n_matched", n_matched, 1000)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise VisaeError(f"concept probe {name} must be an integer in 1..{high}; got {value!r}")
    if acts.shape[1] < 2 * top:
        raise VisaeError(f"concept probe top={top} needs at least {2 * top} latents (its baseline replaces each "
                         f"chosen latent by another); the SAE has {acts.shape[1]}")
    acts = sparse.csr_matrix(acts, dtype=np.float32)
    if acts.nnz and acts.data.min() < 0:
        raise VisaeError("concept probe activations must be >= 0 (0 = the latent does not fire); got negatives")
    return acts, labels.astype(np.int64)


def stratified_halves(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Sorted image indices of two halves, each class split evenly (an odd one out selects)."""
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    grouped = labels[order]
    rank = np.arange(len(labels)) - np.searchsorted(grouped, grouped, side="left")
    return np.sort(order[rank % 2 == 0]), np.sort(order[rank % 2 == 1])


def _column_max(matrix: sparse.csc_matrix) -> np.ndarray:
    return matrix.max(axis=0).toarray().ravel().astype(np.float64)


def _levels(matrix: sparse.csc_matrix, scale: np.ndarray, n_thresholds: int, start: int = 0,
            stop: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the stored entries of columns start..stop: (column - start, row, level), where level L
    means the entry exceeds the thresholds of steps 0..L-1 (activation > step/T x scale)."""
    stop = matrix.shape[1] if stop is None else stop
    lo, hi = matrix.indptr[start], matrix.indptr[stop]
    column = np.repeat(np.arange(stop - start), np.diff(matrix.indptr[start:stop + 1]))
    col_scale = scale[start:stop][column]
    ratio = np.divide(matrix.data[lo:hi], col_scale, out=np.zeros(hi - lo), where=col_scale > 0)
    level = np.clip(np.ceil(ratio * n_thresholds), 0, n_thresholds).astype(np.int64)
    return column, matrix.indices[lo:hi], level


def best_thresholds(matrix: sparse.csc_matrix, scale: np.ndarray, labels: np.ndarray, n_classes: int,
                    n_thresholds: int) -> tuple[np.ndarray, np.ndarray]:
    """For every column (detector) and class: the best F1 over the threshold steps, and its step.

    Columns go in blocks; per block, one bincount over (level, column, class) gives every
    threshold's true positives by a reverse cumulative sum. F1 = 2 TP / (fired + class size).
    Returns float32 [m, C] and int16 [m, C]; ties take the lowest step.
    """
    m = matrix.shape[1]
    class_size = np.bincount(labels, minlength=n_classes).astype(np.float64)
    best_f1 = np.zeros((m, n_classes), dtype=np.float32)
    best_step = np.zeros((m, n_classes), dtype=np.int16)
    block = max(1, BLOCK_ENTRIES // ((n_thresholds + 1) * n_classes))
    for start in range(0, m, block):
        stop = min(start + block, m)
        column, row, level = _levels(matrix, scale, n_thresholds, start, stop)
        key = (level * (stop - start) + column) * n_classes + labels[row]
        counts = np.bincount(key, minlength=(n_thresholds + 1) * (stop - start) * n_classes)
        tp = _above(counts.reshape(n_thresholds + 1, stop - start, n_classes))
        f1 = _f1(tp, tp.sum(axis=2, keepdims=True), class_size)
        best_step[start:stop] = f1.argmax(axis=0)
        best_f1[start:stop] = f1.max(axis=0)
    return best_f1, best_step


def own_class_thresholds(matrix: sparse.csc_matrix, scale: np.ndarray, labels: np.ndarray,
                         n_thresholds: int) -> tuple[np.ndarray, np.ndarray]:
    """best_thresholds for column c as a detector of class c only (the diagonal), without the
    [m, C] detour: best F1 [C] (float64) and its step [C]."""
    m = matrix.shape[1]
    column, row, level = _levels(matrix, scale, n_thresholds)
    own = labels[row] == column
    size = (n_thresholds + 1) * m
    tp = _above(np.bincount(level[own] * m + column[own], minlength=size).reshape(n_thresholds + 1, m))
    fired = _above(np.bincount(level * m + column, minlength=size).reshape(n_thresholds + 1, m))
    f1 = _f1(tp, fired, np.bincount(labels, minlength=m)[:m].astype(np.float64))
    return f1.max(axis=0), f1.argmax(axis=0)


def _above(counts_by_level: np.ndarray) -> np.ndarray:
    """Counts by level [T + 1, ...] -> counts above each step [T, ...] (level > step)."""
    return np.cumsum(counts_by_level[::-1], axis=0)[::-1][1:]


def _f1(tp: np.ndarray, fired: np.ndarray, class_size: np.ndarray) -> np.ndarray:
    """F1 = 2 TP / (fired + class size); 0 where both are 0."""
    denominator = fired + class_size
    return np.divide(2.0 * tp, denominator, out=np.zeros(np.broadcast(tp, denominator).shape), where=denominator > 0)


def _best_prefix(sel: sparse.csc_matrix, latents: np.ndarray, scale: np.ndarray, labels: np.ndarray,
                 n_thresholds: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class, the prefix of its ranked latents (int [top, C]) whose combined score has the
    best selection F1 at its best threshold step: (prefix length [C], its F1 [C], its threshold
    [C]); ties take the shorter prefix. A prefix of one is the single latent's own sweep."""
    top, n_classes = latents.shape
    best_used = np.zeros(n_classes, dtype=np.int64)
    best_f1, best_threshold = np.full(n_classes, -1.0), np.zeros(n_classes)
    for used in range(1, top + 1):
        score = (sel @ _combination(latents, scale, np.full(n_classes, used), sel.shape[1])).tocsc()
        score_scale = _column_max(score)
        f1, step = own_class_thresholds(score, score_scale, labels, n_thresholds)
        better = f1 > best_f1
        best_used[better], best_f1[better] = used, f1[better]
        best_threshold[better] = (step / n_thresholds * score_scale)[better]
    return best_used, best_f1, best_threshold


def _top_latents(best_f1: np.ndarray, top: int) -> np.ndarray:
    """int64 [top, C]: per class, the `top` latents of highest selection F1, best first (ties: lower id)."""
    return np.argsort(-best_f1, axis=0, kind="stable")[:top].astype(np.int64)


def matched_latents(chosen: np.ndarray, frequency: np.ndarray, n_matched: int, rng: np.random.Generator) -> np.ndarray:
    """For each chosen latent (int [top, C]), a random latent among the `n_matched` nearest in
    firing frequency, excluding the class's chosen latents and its earlier replacements."""
    order = np.argsort(frequency, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    top, n_classes = chosen.shape
    matched = np.empty_like(chosen)
    for c in range(n_classes):
        taken = set(chosen[:, c].tolist())
        for i, latent in enumerate(chosen[:, c]):
            reach = n_matched + len(taken)  # a rank window that holds n_matched latents not taken
            window = order[max(0, rank[latent] - reach):rank[latent] + reach + 1]
            window = window[~np.isin(window, list(taken))]
            nearest = window[np.argsort(np.abs(frequency[window] - frequency[latent]), kind="stable")[:n_matched]]
            matched[i, c] = rng.choice(nearest)
            taken.add(int(matched[i, c]))
    return matched


def _combination(latents: np.ndarray, scale: np.ndarray, used: np.ndarray, h: int) -> sparse.csc_matrix:
    """[h, C] weights: column c sums the first used[c] of class c's latents (int [top, C]), each
    divided by its selection max."""
    top, n_classes = latents.shape
    keep = np.arange(top)[:, None] < used[None, :]
    weight = np.divide(1.0, scale[latents], out=np.zeros(latents.shape), where=scale[latents] > 0)
    classes = np.broadcast_to(np.arange(n_classes), latents.shape)
    return sparse.csc_matrix((weight[keep], (latents[keep], classes[keep])), shape=(h, n_classes))


def _f1_at(matrix: sparse.csc_matrix, thresholds: np.ndarray, labels: np.ndarray, class_size: np.ndarray) -> np.ndarray:
    """F1 of column c as a detector of class c (fires where the entry > thresholds[c]); float64 [C]."""
    n_classes = matrix.shape[1]
    column = np.repeat(np.arange(n_classes), np.diff(matrix.indptr))
    on = matrix.data > thresholds[column]
    fired = np.bincount(column[on], minlength=n_classes)
    tp = np.bincount(column[on & (labels[matrix.indices] == column)], minlength=n_classes)
    return _f1(tp, fired, class_size)


def _row(c: int, n_sel: int, n_ev: int, chosen: np.ndarray, matched: np.ndarray, results: dict) -> dict:
    status = "no_images" if n_sel == 0 else "too_few_images" if n_ev == 0 else "ok"
    row = {"class": c, "n_images": int(n_sel + n_ev), "n_select": int(n_sel), "n_evaluate": int(n_ev),
           "status": status}
    scored = status == "ok"
    row["best_latent"] = int(chosen[0]) if scored else None
    row["top_latents"] = chosen.tolist() if scored else None
    row["baseline_latent"] = int(matched[0]) if scored else None
    row["baseline_top_latents"] = matched.tolist() if scored else None
    for key, values in results.items():
        row[key] = (int(values[c]) if key.endswith("top_used") else float(values[c])) if scored else None
    return row


def _summary(rows: list[dict]) -> dict:
    scored = [r for r in rows if r["status"] == "ok"]
    out = {"n_classes": len(rows), "n_scored": len(scored),
           "n_no_images": sum(r["status"] == "no_images" for r in rows),
           "n_too_few_images": sum(r["status"] == "too_few_images" for r in rows)}
    for key in ("f1_single", "f1_top", "baseline_f1_single", "baseline_f1_top", "f1_single_select", "f1_top_select"):
        out["mean_" + key] = float(np.mean([r[key] for r in scored])) if scored else None
    for key in ("single", "top"):
        gaps = [r[f"f1_{key}"] - r[f"baseline_f1_{key}"] for r in scored]
        out[f"mean_gap_{key}"] = float(np.mean(gaps)) if scored else None
    return out
