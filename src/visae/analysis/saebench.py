"""`visae saebench`: SAEBench's metrics (Karvonen et al. 2025) for one vision SAE, each beside a
baseline measured in the same run.

Everything runs on the images the SAE's latent index covers (`visae latents`: the SAE's held-out
images), split once into probe-train and probe-test (stratified by class, seeded):
- sparse probing (Gao et al. 2024; Gurnee et al. 2023): per class, one vs rest, a logistic
  regression on the k latents whose mean image-level activation (the index's: max over patches)
  differs most between the class and the rest on probe-train; balanced accuracy on probe-test.
  Ceiling: the same probe on the model's activations pooled as the SAE features are (max over the
  same tokens; the mean-pooled one, as SAEBench pools, is kept beside it); floor: k random alive
  latents of matched image frequency;
- TPP (targeted probe perturbation): per class a probe on the mean-pooled activations (ablation is
  exactly linear there); ablating the
  latents most tied to class i (their decoder contributions removed from every token, the
  reconstruction error kept) should hurt probe i and spare the others; baseline: as many random
  frequency-matched latents;
- absorption (Chanin et al. 2024), first letters replaced by the class hierarchy (see ADAPTATION);
  baseline: the same count with random frequency-matched main latents;
- shrinkage ||x̂|| / ||x|| and L0 on the covered images' tokens;
- stability (Paulo & Belrose 2025) against a second seed: the share of decoder directions matched
  one-to-one above a cosine threshold; baseline: a random decoder of the same shape.

One streaming pass encodes the tokens (`batch_size` at a time, never [images, tokens, latents]) and
keeps the mean- and max-pooled activations [n, d] and the mean-pooled codes as a sparse [n, h] matrix (the same
non-zeros as the index's). Ablation is linear once pooled: mean_t(x - Σ_J f_j(x) r_j) =
mean_t(x) - Σ_J mean_t(f_j) r_j, with r_j the decoder row in the model's space (W_dec[j] · scale,
as visae.models.edit.LatentEdit edits). Writes sparse_probing.csv, tpp.csv, absorption.csv, then
saebench.json (last: it marks the run done).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from visae.args import (_ranged, device as device_arg, json_object, nonneg_int, open_fraction, positive_int,
                        unit_fraction)
from visae.analysis.latent_index import SparseRows
from visae.atomic import atomic_path, clean_stale_temps, write_json
from visae.errors import VisaeError
from visae.layout import SAEBENCH, SAEBENCH_ABSORPTION, SAEBENCH_PROBING, SAEBENCH_TPP

FORMAT = "visae-saebench/1"
at_least_two = _ranged(int, "an integer >= 2", lambda v: v >= 2, "at_least_two")  # --max-classes, as the schema
DEFAULT_K = (1, 2, 5, 20)
DEFAULT_TPP_LATENTS = 10  # the config schema's saebench.tpp_latents default
VALIDATION_FRACTION = 0.2  # share of probe-train that chooses absorption's k (never probe-test)
N_MATCHED = 10  # a random latent is drawn among the 10 alive latents nearest in image frequency
PROBE_C = 1.0  # inverse L2 strength of every logistic regression (sklearn's default), on standardised inputs
PROBE_MAX_ITER = 1000
N_BOOT = 1000
# SAEBench's absorption constants (sae_bench/evals/absorption: eval_config.py, feature_absorption.py)
ABSORPTION_MAX_K = 10  # max_k_value: main latents are the first k <= 10 of a k-sparse probe
F1_JUMP = 0.03  # f1_jump_threshold: k grows while the probe's F1 rises by more than this
ABSORPTION_COS = 0.025  # ABSORPTION_PROBE_COS_THRESHOLD: the absorber's decoder cosine with the probe
ABSORPTION_SHARE = 0.4  # ABSORPTION_PROBE_PROJECTION_PROPORTION_THRESHOLD: its share of the projection
STABILITY_TOP_K = 32  # candidates per latent when the cosine matrix is too large to assign densely
STABILITY_BLOCK = 1024
# seed streams, so no two draws share random numbers
SPLIT_TAG, FLOOR_TAG, TPP_TAG, ABSORPTION_TAG, DECODER_TAG, CLASSES_TAG = 0x5B1, 0x5B2, 0x5B3, 0x5B4, 0x5B5, 0x5B6
VALIDATION_TAG = 0x5B7

ADAPTATION = ("Chanin et al.'s first-letter task becomes the class hierarchy: each coarse group with at least "
              "two fine classes and some other class beside it is the parent feature (a logistic probe on the "
              "model's mean-pooled activations, group vs rest, fit on probe-train), its fine classes play the "
              "words, and an image plays a token. Main latents: k-sparse probing on the group label over the "
              "index's image-level activations (max over patches), latents ranked by mean difference and k "
              f"grown from 1 while F1 rises by more than {F1_JUMP}, both on a seeded {VALIDATION_FRACTION:g} "
              "validation slice of probe-train (fit on the rest); the k-sparse probe on the chosen latents is "
              "then refit on all of probe-train. 'The main latents do not fire' (SAEBench: every main latent's "
              "activation < 1e-8 on the token) becomes 'the main latents miss the image': their k-sparse probe "
              "predicts not-the-group (logit <= 0) on a probe-test image of the group that the parent probe "
              "gets right, since image-level main latents are dense (a latent firing weakly on some patch of "
              "every image is never silent). Such an image is absorbed when the latent of largest projection "
              "on the parent probe's unit direction u (its mean-pooled code times (W_dec[j] scale) . u) is not "
              f"a main latent, has decoder cosine >= {ABSORPTION_COS} with u, and carries >= "
              f"{ABSORPTION_SHARE} of the image's projection (mean-pooled x - decode(0)) . u > 0 (SAEBench's "
              "full-absorption test)")


@dataclass
class Encoded:
    """What one pass over the covered images' tokens keeps."""

    pooled: np.ndarray  # float64 [n, d] the model's activations, mean over the pooled tokens
    pooled_max: np.ndarray  # float64 [n, d] the same, max over the pooled tokens (as the index pools the SAE)
    codes: sp.csr_matrix  # float32 [n, h] the SAE's codes, mean over the pooled tokens
    tokens: int
    shrinkage_sum: float  # Σ ||x̂|| / ||x|| in the model's space
    shrinkage_centred_sum: float  # Σ ||x̂ - mu|| / ||x - mu|| around the SAE's normalisation mean
    l0_sum: float
    zero_norm_tokens: int  # tokens with ||x|| = 0, left out of the shrinkage
    centred_tokens: int  # tokens with ||x - mu|| > 0, those the centred shrinkage averages


def encode_pass(store, sae, images: np.ndarray, tokens: np.ndarray, batch_tokens: int, device: str) -> Encoded:
    """Encode the images' tokens `batch_tokens` at a time: mean- and max-pooled activations,
    mean-pooled codes (sparse), shrinkage and L0 sums. Decoding is sparse (only the firing latents' rows)."""
    import torch

    n, p, h, d = len(images), len(tokens), sae.width, sae.d_model
    step = max(1, batch_tokens // max(p, 1))
    pooled = np.zeros((n, d), dtype=np.float64)
    pooled_max = np.zeros((n, d), dtype=np.float64)
    mean_codes = SparseRows()
    shrink, shrink_c, l0, zero, n_centred = 0.0, 0.0, 0.0, 0, 0
    w_dec = sae.W_dec.detach()
    with torch.no_grad():
        for lo in range(0, n, step):
            chunk = images[lo:lo + step]
            x = store.take(chunk, tokens).to(device=device, dtype=torch.float32).reshape(-1, d)
            f = sae.encode(x)
            if not torch.isfinite(f).all():
                raise VisaeError("the SAE gives non-finite activations on its store: the SAE is broken")
            fs = f.to_sparse()
            xhat = sae.denormalise(sae.b_dec + torch.sparse.mm(fs, w_dec))
            norm = x.double().norm(dim=1)
            ok = norm > 0
            zero += int((~ok).sum())
            shrink += float((xhat.double().norm(dim=1)[ok] / norm[ok]).sum())
            centred = (x.double() - sae.mu.double()).norm(dim=1)
            okc = centred > 0
            n_centred += int(okc.sum())
            shrink_c += float(((xhat.double() - sae.mu.double()).norm(dim=1)[okc] / centred[okc]).sum())
            l0 += float((f > 0).sum())
            per_image = x.double().reshape(len(chunk), p, d)
            pooled[lo:lo + len(chunk)] = per_image.mean(1).cpu().numpy()
            pooled_max[lo:lo + len(chunk)] = per_image.amax(1).cpu().numpy()
            mean_codes.append(f.reshape(len(chunk), p, h).mean(1).cpu())
    codes = sp.csr_matrix(mean_codes.arrays(), shape=(n, h))
    return Encoded(pooled, pooled_max, codes, n * p, shrink, shrink_c, l0, zero, n_centred)


# -- probes -----------------------------------------------------------------------------------

def stratified_split(labels: np.ndarray, train_fraction: float, seed: int,
                     tag: int = SPLIT_TAG) -> tuple[np.ndarray, np.ndarray]:
    """(probe-train, probe-test) row positions, ascending: per class a seeded share of
    round(train_fraction x its size) trains, at least one image on each side when it has two."""
    rng = np.random.default_rng([seed, tag])
    train = []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_train = int(round(train_fraction * len(rows)))
        if len(rows) >= 2:
            n_train = min(max(n_train, 1), len(rows) - 1)
        train.append(rows[:n_train])
    train = np.sort(np.concatenate(train)) if train else np.zeros(0, np.int64)
    return train, np.setdiff1d(np.arange(len(labels)), train)


def fit_probe(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """A class-balanced, L2-regularised logistic regression (sklearn, lbfgs) on standardised
    features, returned as (w, b) on the raw features: logit = x @ w + b."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(x, dtype=np.float64)
    mean, sd = x.mean(0), x.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    model = LogisticRegression(C=PROBE_C, class_weight="balanced", max_iter=PROBE_MAX_ITER, random_state=seed)
    model.fit((x - mean) / sd, y.astype(np.int64))
    w = model.coef_[0] / sd
    return w, float(model.intercept_[0] - w @ mean)


def balanced_accuracy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(true-positive rate + true-negative rate) / 2 of `logits` > 0 against y (bool), per column:
    logits [n] or [n, m], y [n] or [n, m]."""
    logits = logits.reshape(len(y), -1)
    y = y.reshape(len(y), -1)
    pred = logits > 0
    tpr = (pred & y).sum(0) / np.maximum(y.sum(0), 1)
    tnr = (~pred & ~y).sum(0) / np.maximum((~y).sum(0), 1)
    return (tpr + tnr) / 2


def f1_score(logits: np.ndarray, y: np.ndarray) -> float:
    pred = logits > 0
    tp = int((pred & y).sum())
    return 2 * tp / max(int(pred.sum()) + int(y.sum()), 1)


def group_sums(acts: sp.csr_matrix, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """float64 [h, n_groups]: each latent's summed activation over the rows of each group (one
    sparse product, so the [rows, h] matrix is never copied per class)."""
    onehot = sp.csr_matrix((np.ones(len(groups)), (np.arange(len(groups)), groups)), shape=(len(groups), n_groups))
    return np.asarray((acts.T @ onehot).todense(), dtype=np.float64)


def mean_difference(sums: np.ndarray, total: np.ndarray, counts: np.ndarray, g: int) -> np.ndarray:
    """Per latent, its mean over group g's rows minus its mean over the other rows (`total`: the
    sums over all rows)."""
    rest = counts.sum() - counts[g]
    return sums[:, g] / max(counts[g], 1) - (total - sums[:, g]) / max(rest, 1)


def top_alive(score: np.ndarray, alive_ids: np.ndarray, k: int) -> np.ndarray:
    """The k alive latents of highest score, best first (ties: the lower id)."""
    order = np.argsort(-score[alive_ids], kind="stable")[:k]
    return alive_ids[order]


def matched_random(chosen: np.ndarray, frequency: np.ndarray, alive_ids: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """For each chosen (alive) latent, a random alive latent among the N_MATCHED nearest to it in
    image frequency, never a chosen one nor an earlier draw (visae.analysis.concepts' rule)."""
    from visae.analysis.concepts import matched_latents

    at = np.searchsorted(alive_ids, chosen)
    drawn = matched_latents(at[:, None], frequency[alive_ids], min(N_MATCHED, len(alive_ids) - len(chosen)), rng)
    return alive_ids[drawn[:, 0]]


def interval(values, seed: int) -> dict:
    from visae.analysis.stats import bootstrap_mean

    values = np.asarray(values, dtype=np.float64)
    return bootstrap_mean(values[np.isfinite(values)], np.random.default_rng(seed), N_BOOT)


def _ids(latents) -> str:
    return " ".join(str(int(j)) for j in latents)


def _value(stat: dict | None) -> float | None:
    v = None if stat is None else stat.get("value")
    return float(v) if v is not None and np.isfinite(v) else None


# -- the metrics ------------------------------------------------------------------------------

def sparse_probing(acts, pooled, pooled_max, labels, train, test, classes, names, ks, alive_ids, frequency, seed):
    """Rows (class, k, method, accuracy, latents) and, per class, its mean-pooled ceiling probe (w, b)
    (TPP's). Method "ceiling" probes the max-pooled activations, as the SAE features are pooled;
    "ceiling_mean_pooled" the mean-pooled ones (SAEBench's pooling)."""
    rows, probes = [], {}
    a_train, a_test = acts[train], acts[test]
    sums = group_sums(a_train, labels[train], len(names))
    total, counts = sums.sum(1), np.bincount(labels[train], minlength=len(names))
    for c in classes:
        y_train, y_test = labels[train] == c, labels[test] == c
        for method, x in (("ceiling", pooled_max), ("ceiling_mean_pooled", pooled)):
            w, b = fit_probe(x[train], y_train, seed)
            rows.append({"class": c, "class_name": names[c], "k": None, "method": method,
                         "accuracy": float(balanced_accuracy(x[test] @ w + b, y_test)[0]), "latents": ""})
        probes[c] = (w, b)
        diff = mean_difference(sums, total, counts, c)
        for k in ks:
            chosen = top_alive(diff, alive_ids, k)
            rng = np.random.default_rng([seed, FLOOR_TAG, int(c), int(k)])
            for method, latents in (("sae", chosen), ("random", matched_random(chosen, frequency, alive_ids, rng))):
                x_train, x_test = a_train[:, latents].toarray(), a_test[:, latents].toarray()
                w_k, b_k = fit_probe(x_train, y_train, seed)
                rows.append({"class": c, "class_name": names[c], "k": k, "method": method,
                             "accuracy": float(balanced_accuracy(x_test @ w_k + b_k, y_test)[0]),
                             "latents": _ids(latents)})
    return rows, probes


def tpp(acts, codes, rows_model, pooled, labels, train, test, classes, names, probes, n_latents, alive_ids,
        frequency, seed):
    """Per class i: probe i's accuracy drop when class i's latents are ablated, minus the mean drop
    of the other probes; for the index's latents and for random frequency-matched ones."""
    classes = list(classes)
    W = np.stack([probes[c][0] for c in classes])  # [C, d]
    b = np.array([probes[c][1] for c in classes])
    y = np.stack([labels[test] == c for c in classes], axis=1)  # [n_test, C]
    logits = pooled[test] @ W.T + b
    base = balanced_accuracy(logits, y)
    # per class, the mean image-level activation on its probe-train images (classes without any left out)
    counts = np.bincount(labels[train], minlength=len(names))
    present = np.flatnonzero(counts)
    means = group_sums(acts[train], labels[train], len(names))[:, present] / counts[present]
    codes_test = codes[test].tocsc()
    means_total = means.sum(1)
    out = []
    for i, c in enumerate(classes):
        col = int(np.searchsorted(present, c))
        others = (means_total - means[:, col]) / max(len(present) - 1, 1)
        tied = top_alive(means[:, col] - others, alive_ids, n_latents)
        rng = np.random.default_rng([seed, TPP_TAG, int(c)])
        for method, latents in (("sae", tied), ("random", matched_random(tied, frequency, alive_ids, rng))):
            shift = codes_test[:, latents] @ (rows_model[latents] @ W.T)  # [n_test, C]: the ablation's logit change
            acc = balanced_accuracy(logits - np.asarray(shift), y)
            drop = base - acc
            other = np.delete(drop, i).mean() if len(classes) > 1 else 0.0
            out.append({"class": c, "class_name": names[c], "method": method, "accuracy": float(base[i]),
                        "accuracy_ablated": float(acc[i]), "drop": float(drop[i]), "drop_others": float(other),
                        "tpp": float(drop[i] - other), "latents": _ids(latents)})
    return out


def main_latents(a_fit, y_fit, a_val, y_val, diff, alive_ids, max_k, seed):
    """SAEBench's feature-splitting rule: the first k latents by `diff` (chosen on the fit rows),
    k grown from 1 while the k-sparse probe's F1 on the validation rows rises by more than F1_JUMP.
    (main latents, F1 per k tried)."""
    main, best, f1s = np.zeros(0, np.int64), -np.inf, []
    for k in range(1, max_k + 1):
        chosen = top_alive(diff, alive_ids, k)
        w_k, b_k = fit_probe(a_fit[:, chosen].toarray(), y_fit, seed)
        f1 = f1_score(a_val[:, chosen].toarray() @ w_k + b_k, y_val)
        f1s.append(f1)
        if f1 <= best + F1_JUMP:
            break
        best, main = f1, chosen
    return main, f1s


def absorption(acts, codes, rows_model, origin, pooled, labels, train, test, tree, names, alive_ids, frequency,
               seed):
    """Per coarse group of >= 2 fine classes (and some class outside it): main latents by k-sparse
    probing (k chosen on a validation slice of probe-train), then the share of the parent probe's
    true positives on probe-test that are absorbed (see ADAPTATION); rows per group and per fine
    class, the groups' entries, and a line per group left out."""
    coarse = tree.coarse_of[labels]
    at_fit, at_val = stratified_split(labels[train], 1 - VALIDATION_FRACTION, seed, VALIDATION_TAG)
    fit, val = train[at_fit], train[at_val]
    a_fit, a_val, a_train, a_test = acts[fit], acts[val], acts[train], acts[test]
    sums = group_sums(a_fit, coarse[fit], len(tree.coarse_names))
    total, counts = sums.sum(1), np.bincount(coarse[fit], minlength=len(tree.coarse_names))
    codes_test = codes[test].tocsr()
    max_k = min(ABSORPTION_MAX_K, len(alive_ids) // 2)
    rows, groups, skipped = [], [], []
    for g, group in enumerate(tree.coarse_names):
        members = [c for c in np.flatnonzero(tree.coarse_of == g) if (labels == c).any()]
        y_train, y_test = coarse[train] == g, coarse[test] == g
        if len(members) < 2 or not y_test.any() or not y_train.any():
            continue
        if y_train.all() or y_test.all():
            skipped.append(f"group {group!r} holds every class with images: no rest to probe it against, left out")
            continue
        w, b = fit_probe(pooled[train], y_train, seed)
        u = w / max(np.linalg.norm(w), 1e-12)
        right = y_test & (pooled[test] @ w + b > 0)  # the parent probe's true positives
        projection = (pooled[test] - origin) @ u  # along the probe, from the SAE's zero-code reconstruction
        latent_proj = rows_model @ u  # [h]: a unit of latent j moves the pooled activations this far along u
        cosine = latent_proj / np.maximum(np.linalg.norm(rows_model, axis=1), 1e-12)
        main, f1s = main_latents(a_fit, coarse[fit] == g, a_val, coarse[val] == g, mean_difference(
            sums, total, counts, g), alive_ids, max_k, seed)
        rng = np.random.default_rng([seed, ABSORPTION_TAG, g])
        random_main = matched_random(main, frequency, alive_ids, rng)
        entry = {"group": group, "classes": [names[c] for c in members], "main_latents": main.tolist(),
                 "random_main_latents": random_main.tolist(), "f1_by_k": f1s, "parent_probe_true_positives":
                 int(right.sum()), "parent_probe_accuracy": float(balanced_accuracy(pooled[test] @ w + b, y_test)[0])}
        for method, latents in (("sae", main), ("random", random_main)):
            w_k, b_k = fit_probe(a_train[:, latents].toarray(), y_train, seed)  # refit on all of probe-train
            logits = a_test[:, latents].toarray() @ w_k + b_k
            missed = right & (logits <= 0)
            absorbed = np.zeros(len(test), dtype=bool)
            at = np.flatnonzero(missed)
            if len(at):
                proj = (codes_test[at] @ sp.diags(latent_proj)).tocsr()  # each firing latent's projection
                top_value = proj.max(axis=1).toarray().ravel()
                top = np.asarray(proj.argmax(axis=1)).ravel()
                absorbed[at] = ((top_value > 0) & ~np.isin(top, latents) & (cosine[top] >= ABSORPTION_COS)
                                & (projection[at] > 0) & (top_value >= ABSORPTION_SHARE * projection[at]))
            entry["main_probe_accuracy" if method == "sae" else "random_probe_accuracy"] = float(
                balanced_accuracy(logits, y_test)[0])
            levels = [("group", None, np.ones(len(test), bool))] + [("class", c, labels[test] == c) for c in members]
            for level, cls, mask in levels:
                n_tp = int((right & mask).sum())
                rate = float((absorbed & mask).sum() / n_tp) if n_tp else None
                rows.append({"group": group, "level": level, "class": cls,
                             "class_name": "" if cls is None else names[cls], "method": method,
                             "true_positives": n_tp, "main_missed": int((missed & mask).sum()),
                             "absorbed": int((absorbed & mask).sum()), "rate": rate, "main_latents": _ids(latents)})
                if level == "group":
                    entry["rate" if method == "sae" else "rate_random"] = rate
        groups.append(entry)
    return rows, groups, skipped


def decoder_cosines(a: np.ndarray, b: np.ndarray, device: str = "cpu"):
    """Each row's cosine with every row of b as a visae.analysis.matching.Correlations: the dense
    matrix when it fits the dense assignment, else each side's top STABILITY_TOP_K (pairs above a
    cosine threshold of 0.5 or more are among them unless a latent has that many such partners),
    computed in blocks of rows on `device`."""
    import torch

    from visae.analysis.matching import DENSE_LIMIT, Correlations

    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    ta, tb = torch.from_numpy(a.astype(np.float32)).to(device), torch.from_numpy(b.astype(np.float32)).to(device)
    h_a, h_b = len(a), len(b)
    k_a, k_b = min(STABILITY_TOP_K, h_b), min(STABILITY_TOP_K, h_a)
    dense = (ta @ tb.T).cpu().numpy() if h_a * h_b <= DENSE_LIMIT else None
    row_v, row_i = [], []
    col_v = torch.full((k_b, h_b), -torch.inf, device=device)
    col_i = torch.zeros((k_b, h_b), dtype=torch.int64, device=device)
    for i0 in range(0, h_a, STABILITY_BLOCK):
        cos = ta[i0:i0 + STABILITY_BLOCK] @ tb.T
        v, i = cos.topk(k_a, dim=1)
        row_v.append(v)
        row_i.append(i)
        v, i = cos.topk(min(k_b, len(cos)), dim=0)
        merged_v, pick = torch.cat([col_v, v]).topk(k_b, dim=0)
        col_i = torch.cat([col_i, i + i0]).gather(0, pick)
        col_v = merged_v
    return Correlations(a.shape[1], torch.cat(row_v).double().cpu().numpy(), torch.cat(row_i).cpu().numpy(),
                        col_v.T.double().cpu().numpy().copy(), col_i.T.cpu().numpy().copy(), dense)


def stability(w_dec: np.ndarray, twin_dec: np.ndarray, threshold: float, alive: np.ndarray, seed: int,
              device: str = "cpu") -> dict:
    """The share of this SAE's decoder directions paired one-to-one with the twin's at cosine >
    threshold, and the same against a seeded random decoder of the same shape."""
    from visae.analysis.matching import assign

    def share(other):
        match = assign(decoder_cosines(w_dec, other, device))
        above = match.correlation > threshold
        return {"share": float(above.mean()), "share_alive": float(above[alive].mean()) if alive.any() else None,
                "mean_matched_cosine": float(match.correlation.mean()), "assignment": match.method}

    random_dec = np.random.default_rng([seed, DECODER_TAG]).standard_normal(twin_dec.shape)
    return {"twin": share(twin_dec), "random": share(random_dec), "threshold": threshold,
            "matching": "one-to-one assignment maximising the summed signed cosine of decoder rows (scipy "
                        "linear_sum_assignment; a sparse full bipartite matching over each row's top "
                        f"{STABILITY_TOP_K} where the matrix is too large); pairs at cosine <= 0 count as "
                        "unmatched; share = matched above the threshold / this SAE's width",
            "random_decoder": "i.i.d. standard normal rows of the twin's shape, seeded"}


# -- the run ----------------------------------------------------------------------------------

def open_sources(index):
    """(store, SAE, token positions) the index was built from, verified: the same store data and
    SAE weights, and covered images among the SAE's held-out ones."""
    from visae.analysis.latent_index import pooled_tokens, sae_weights_sha256
    from visae.analysis.on_store import open_sae_on_store

    ctx = open_sae_on_store(index.meta["store"], index.meta["sae_path"],
                            allow_mismatch=bool(index.meta.get("source_mismatch")))
    if ctx.store.store_hash != index.identity.store_hash:
        raise VisaeError(f"store {index.meta['store']} changed since the latent index {index.identity.key} was "
                         f"built: rerun `visae latents`")
    if sae_weights_sha256(index.meta["sae_path"]) != index.meta.get("sae_sha256"):
        raise VisaeError(f"SAE {index.meta['sae_path']} changed since the latent index {index.identity.key} was "
                         f"built: rerun `visae latents`")
    if not np.isin(index.images, ctx.held).all():
        raise VisaeError(f"the latent index {index.identity.key} covers images the SAE was trained on: rerun "
                         f"`visae latents`")
    tokens, kind = pooled_tokens(ctx.store)
    if kind != index.meta.get("pooled_tokens", kind):
        raise VisaeError(f"the latent index pooled {index.meta.get('pooled_tokens')} tokens but the store now "
                         f"offers {kind}: rerun `visae latents`")
    return ctx.store, ctx.sae, tokens, kind


def trained_on(sae) -> dict:
    """What an SAE was trained on, from its config.json: the store's hash (its identity, else its
    source), the layer, and its width."""
    cfg = sae.config
    identity, source = cfg.get("identity") or {}, cfg.get("source") or {}
    return {"store_hash": identity.get("store_hash", source.get("store_hash")),
            "layer": identity.get("layer", source.get("layer")), "width": int(sae.width)}


def load_twin(twin, sae):
    """The second seed of `sae` (the index's SAE), refused unless trained on the same store and
    layer at the same width and d_model."""
    from visae.analysis.on_store import check_finished
    from visae.sae import checkpoint as ckpt

    twin_sae = ckpt.load(twin)
    check_finished(Path(twin), twin_sae.config)
    ours, theirs = trained_on(sae), trained_on(twin_sae)
    if twin_sae.d_model != sae.d_model:
        ours, theirs = {"d_model": sae.d_model}, {"d_model": twin_sae.d_model}
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        what = ", ".join(f"{k} {theirs[k]} (this SAE: {ours[k]})" for k in differ)
        raise VisaeError(f"twin SAE {twin} has {what}: a twin is another seed of the same SAE on the same store "
                         f"and layer")
    return twin_sae


def run_saebench(index_dir, *, twin=None, hierarchy: dict | None = None, ks=DEFAULT_K,
                 tpp_latents: int = DEFAULT_TPP_LATENTS,
                 stability_threshold: float = 0.7, train_fraction: float = 0.5, max_classes: int | None = None,
                 seed: int = 0, batch_size: int = 4096, device: str = "cpu"):
    """(saebench.json's content without provenance, sparse_probing rows, tpp rows, absorption rows)."""
    import torch

    from visae.analysis.latent_index import LatentIndex
    from visae.analysis.profile import build_hierarchy

    ks = sorted({int(k) for k in ks})  # positive: the CLI's positive_int
    index = LatentIndex.load(index_dir)
    names, labels = index.classes, index.labels
    tree = build_hierarchy(names, hierarchy)
    alive_ids = np.flatnonzero(index.alive)
    need = 2 * max(ks[-1], tpp_latents)
    if len(alive_ids) < need:
        raise VisaeError(f"SAE {index.identity.sae} has {len(alive_ids)} alive latents on its index; k = {ks[-1]} "
                         f"and --tpp-latents {tpp_latents} need at least {need} (each baseline draws as many others)")
    train, test = stratified_split(labels, train_fraction, seed)
    counts_train = np.bincount(labels[train], minlength=len(names))
    counts_test = np.bincount(labels[test], minlength=len(names))
    classes = np.flatnonzero((counts_train > 0) & (counts_test > 0))
    if len(classes) < 2 or len(np.unique(labels)) < 2:
        raise VisaeError(f"the latent index {index.identity.key} has {len(classes)} class(es) with images on both "
                         f"sides of the probe split: sparse probing needs at least 2")
    if max_classes is not None and len(classes) > max_classes:
        classes = np.sort(np.random.default_rng([seed, CLASSES_TAG]).choice(classes, max_classes, replace=False))

    store, sae, tokens, kind = open_sources(index)
    twin_sae = None if twin is None else load_twin(twin, sae)
    sae = sae.to(device)
    enc = encode_pass(store, sae, index.images, tokens, batch_size, device)
    w_dec = sae.W_dec.detach().double().cpu().numpy()
    rows_model = w_dec * float(sae.scale)  # decoder rows in the model's space
    with torch.no_grad():
        origin = sae.decode(torch.zeros(1, sae.width, device=device)).double().cpu().numpy()[0]
    acts, codes = index.acts.tocsr(), enc.codes
    frequency = index.frequency.astype(np.float64)

    probing_rows, probes = sparse_probing(acts, enc.pooled, enc.pooled_max, labels, train, test, classes, names,
                                          ks, alive_ids, frequency, seed)
    tpp_rows = tpp(acts, codes, rows_model, enc.pooled, labels, train, test, classes, names, probes, tpp_latents,
                   alive_ids, frequency, seed)
    absorption_rows, groups, skipped = absorption(acts, codes, rows_model, origin, enc.pooled, labels, train, test,
                                                  tree, names, alive_ids, frequency, seed)

    probing = pd.DataFrame(probing_rows)
    by = {(m, k): probing[(probing.method == m) & (probing.k == k)].accuracy.to_numpy() for m in ("sae", "random")
          for k in ks}
    ceiling = interval(probing[probing.method == "ceiling"].accuracy, seed)
    ceiling_mean = interval(probing[probing.method == "ceiling_mean_pooled"].accuracy, seed)
    per_k = {str(k): {"sae": interval(by["sae", k], seed), "random": interval(by["random", k], seed)} for k in ks}
    tpp_frame = pd.DataFrame(tpp_rows)
    tpp_stats = {m: interval(tpp_frame[tpp_frame.method == m].tpp, seed) for m in ("sae", "random")}
    tpp_std = {m: float(tpp_frame[tpp_frame.method == m].tpp.std(ddof=0)) for m in ("sae", "random")}
    rates = [g["rate"] for g in groups if g["rate"] is not None]
    rates_random = [g["rate_random"] for g in groups if g["rate_random"] is not None]
    absorption_mean = float(np.mean(rates)) if rates else None
    absorption_random = float(np.mean(rates_random)) if rates_random else None
    shrinkage = enc.shrinkage_sum / max(enc.tokens - enc.zero_norm_tokens, 1)
    stab = None
    if twin_sae is not None:
        stab = {"twin_path": str(twin), "twin_name": twin_sae.config.get("name"),
                "twin_seed": twin_sae.config.get("seed"),
                **stability(w_dec, twin_sae.W_dec.detach().double().numpy(), stability_threshold, index.alive, seed,
                            device)}

    metrics = {"l0": enc.l0_sum / max(enc.tokens, 1)}
    metrics |= {f"sparse_probing_k{k}": _value(per_k[str(k)]["sae"]) for k in ks}
    metrics["sparse_probing_ceiling"] = _value(ceiling)
    metrics |= {f"sparse_probing_floor_k{k}": _value(per_k[str(k)]["random"]) for k in ks}
    metrics |= {"tpp": _value(tpp_stats["sae"]), "tpp_std": tpp_std["sae"],
                "tpp_random": _value(tpp_stats["random"]), "tpp_random_std": tpp_std["random"],
                "absorption": absorption_mean, "absorption_random": absorption_random, "shrinkage": shrinkage,
                "stability": stab["twin"]["share"] if stab else None,
                "stability_random": stab["random"]["share"] if stab else None}
    result = {
        "format": FORMAT, "identity": index.identity.to_dict(), "architecture": index.meta.get("architecture"),
        "entry": index.meta.get("entry"), "width": index.width, "index": str(index_dir),
        "metrics": {k: (float(v) if v is not None and np.isfinite(v) else None) for k, v in metrics.items()},
        "images": {"covered": len(index.images), "probe_train": len(train), "probe_test": len(test),
                   "split": f"per class, a seeded {train_fraction:g} of the index's images trains the probes, the "
                            f"rest tests them", "alive_latents": len(alive_ids), "pooled_tokens": kind,
                   "classes_evaluated": [names[c] for c in classes]},
        "sparse_probing": {
            "ks": ks, "per_k": per_k, "ceiling": ceiling, "ceiling_mean_pooled": ceiling_mean,
            "sae_features": "the latent index's image-level activations (max over the pooled tokens)",
            "ceiling_features": f"the model's activations at the layer, max-pooled (per dimension) over the same "
                                f"{kind} tokens, as the SAE features are pooled: metrics.sparse_probing_ceiling",
            "ceiling_mean_pooled_features": f"the model's activations mean-pooled over the same {kind} tokens "
                                            "(SAEBench's pooling; these probes are TPP's), detail only",
            "selection": "per class, the k alive latents of largest mean image-level activation on the class minus "
                         "on the rest, on probe-train",
            "probe": f"sklearn LogisticRegression, class_weight=balanced, C={PROBE_C}, lbfgs, on standardised "
                     "features, fit on probe-train, one vs rest",
            "accuracy": "balanced accuracy ((TPR + TNR) / 2) on probe-test",
            "floor": f"per chosen latent, a random alive latent among the {N_MATCHED} nearest in image frequency "
                     "(none of the chosen), seeded",
        },
        "tpp": {
            "latents": tpp_latents, "sae": tpp_stats["sae"], "random": tpp_stats["random"], "std": tpp_std,
            "probes": "the mean-pooled sparse-probing ceiling probes (one vs rest on the mean-pooled activations, "
                      "probe-train): mean-pooling keeps the ablation exactly linear, max-pooling would not",
            "selection": "per class i, the alive latents of largest mean image-level activation on class i minus "
                         "the mean over the other classes' means, on probe-train",
            "ablation": "x' = x - sum_j f_j(x) W_dec[j] scale on every pooled token of the probe-test images (the "
                        "reconstruction error kept), then mean-pooled",
            "score": "tpp_i = drop of probe i's balanced accuracy - mean drop of the other probes; tpp = mean "
                     "over classes; std: its standard deviation over classes (ddof 0; metrics.tpp_std, "
                     "tpp_random_std)",
            "baseline": f"as many random alive latents, each among the {N_MATCHED} nearest in image frequency",
        },
        "absorption": {
            "adaptation": ADAPTATION, "groups": groups, "hierarchy": tree.describe(),
            "value": absorption_mean, "random": absorption_random,
            "constants": {"max_k": ABSORPTION_MAX_K, "f1_jump": F1_JUMP, "probe_cos": ABSORPTION_COS,
                          "projection_share": ABSORPTION_SHARE,
                          "source": "SAEBench sae_bench/evals/absorption (max_k_value, f1_jump_threshold, "
                                    "ABSORPTION_PROBE_COS_THRESHOLD, ABSORPTION_PROBE_PROJECTION_PROPORTION_"
                                    "THRESHOLD: its full-absorption score)"},
            "main_latents": f"k-sparse probing on the group label over image-level activations: latents by mean "
                            f"difference on {1 - VALIDATION_FRACTION:g} of probe-train, k grown from 1 while the "
                            f"probe's F1 on the other {VALIDATION_FRACTION:g} (a seeded validation slice, per "
                            "class) rises by more than f1_jump (SAEBench's feature-splitting rule); probe-test is "
                            "never used to choose",
            "miss": "the k-sparse probe on the main latents, refit on all of probe-train, predicts not-the-group "
                    "(logit <= 0) on an image the parent probe gets right (SAEBench: every main latent silent)",
            "projection": "(mean-pooled x - decode(0)) . u for the parent probe's unit direction u in the model's "
                          "space; a latent's share: its mean-pooled code x (W_dec[j] scale) . u; the absorber is "
                          "the latent of largest share and must not be a main latent",
            "rate": "absorbed / the parent probe's true positives on probe-test; absorption = mean over groups",
            "baseline": "the same count with the main latents replaced by random alive latents of matched image "
                      "frequency (what the criterion gives when the main latents say nothing about the group)",
            "note": "; ".join(skipped + ([] if groups else [
                "no coarse group with two or more fine classes and a class outside it is left"
                + (" (give --hierarchy)" if tree.kind == "flat" else "")])) or None,
            "groups_left_out": skipped,
        },
        "shrinkage": {"value": shrinkage, "l0": metrics["l0"], "tokens": enc.tokens,
                      "centred": enc.shrinkage_centred_sum / max(enc.centred_tokens, 1),
                      "zero_norm_tokens": enc.zero_norm_tokens,
                      "definition": f"mean over the covered images' {kind} tokens of ||x_hat|| / ||x|| in the "
                                    "model's space (centred: both minus the SAE's normalisation mean); l0: mean "
                                    "firing latents per token"},
        "stability": stab,
        "params": {"k": ks, "tpp_latents": tpp_latents, "stability_threshold": stability_threshold,
                   "train_fraction": train_fraction, "max_classes": max_classes, "seed": seed,
                   "batch_size": batch_size, "device": device, "twin": None if twin is None else str(twin),
                   "hierarchy": hierarchy or None},
    }
    absorption_frame = pd.DataFrame(absorption_rows, columns=["group", "level", "class", "class_name", "method",
                                                               "true_positives", "main_missed", "absorbed", "rate",
                                                               "main_latents"])
    return result, probing, tpp_frame, absorption_frame


def write_saebench(out, result: dict, tables: dict[str, pd.DataFrame], config: dict, started: float) -> None:
    """The three tables (identity columns first), then saebench.json with provenance (last)."""
    from visae.provenance import provenance

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    (out / SAEBENCH).unlink(missing_ok=True)  # an older run's marker never outlives its tables
    identity = result["identity"]
    for name, frame in tables.items():
        lead = pd.DataFrame({k: [v] * len(frame) for k, v in identity.items()})
        frame = pd.concat([lead, frame.reset_index(drop=True)], axis=1)
        for column in ("k", "class"):
            if column in frame:
                frame[column] = frame[column].astype("Int64")
        with atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
    write_json(out / SAEBENCH, {**result, "provenance": provenance(config, seeds={"saebench": config["seed"]},
                                                                   started=started)})


def cmd_saebench(args) -> int:
    started = time.time()
    hierarchy = json_object(args.hierarchy, "--hierarchy") if args.hierarchy else None
    result, probing, tpp_rows, absorption_rows = run_saebench(
        args.index, twin=args.twin, hierarchy=hierarchy, ks=args.k, tpp_latents=args.tpp_latents,
        stability_threshold=args.stability_threshold, train_fraction=args.train_fraction,
        max_classes=args.max_classes, seed=args.seed, batch_size=args.batch_size, device=args.device)
    config = {"index": str(args.index), **result["params"]}
    write_saebench(args.out, result, {SAEBENCH_PROBING: probing, SAEBENCH_TPP: tpp_rows,
                                      SAEBENCH_ABSORPTION: absorption_rows}, config, started)
    m = result["metrics"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    k = result["sparse_probing"]["ks"][0]
    print(f"{result['identity']['sae']}: sparse probing k={k} {fmt(m[f'sparse_probing_k{k}'])} (floor "
          f"{fmt(m[f'sparse_probing_floor_k{k}'])}, ceiling {fmt(m['sparse_probing_ceiling'])}), tpp {fmt(m['tpp'])} "
          f"(random {fmt(m['tpp_random'])}), absorption {fmt(m['absorption'])} (random {fmt(m['absorption_random'])}),"
          f" shrinkage {fmt(m['shrinkage'])}, stability {fmt(m['stability'])} (random {fmt(m['stability_random'])}) "
          f"-> {args.out}")
    return 0


def add_cli(subparsers) -> None:
    p = subparsers.add_parser("saebench", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--index", required=True, help="the SAE's latent index folder (`visae latents`)")
    p.add_argument("--out", required=True)
    p.add_argument("--twin", default=None, help="the same SAE trained from another seed (its checkpoint folder): "
                                                "stability; without it the stability fields are null")
    p.add_argument("--hierarchy", default=None,
                   help='{"groups": {group: [class, ...]}} or {"wordnet": DIR, "coarse_depth": N} (the config\'s '
                        'compare.hierarchy); without it no group has two classes and absorption is null')
    p.add_argument("--k", type=positive_int, nargs="+", default=list(DEFAULT_K), help="sparse-probing k values")
    p.add_argument("--tpp-latents", type=positive_int, default=DEFAULT_TPP_LATENTS,
                   help="latents ablated per class for TPP")
    p.add_argument("--stability-threshold", type=unit_fraction, default=0.7,
                   help="decoder cosine above which a matched pair counts as shared")
    p.add_argument("--train-fraction", type=open_fraction, default=0.5, help="share of each class that trains probes")
    p.add_argument("--max-classes", type=at_least_two, default=None,
                   help="score at most this many classes (a seeded sample); default all")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=4096, help="tokens encoded at a time")
    p.add_argument("--device", type=device_arg, default="cpu")
    p.set_defaults(func=cmd_saebench)
