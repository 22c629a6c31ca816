"""`visae report browser`: a static latent browser, opened from file:// with no server.

Per SAE (every latent index given), a sortable, filterable page of all its latents (frequency, max
activation, abstraction, invariance, the correlation of its match in each comparison) and one
page per latent: its top images with the latent's patch heatmap on each, the histogram of its
image-level activation, its firing rate per class, its match in the other model (and its second
seed's), linked, and its intervention effect next to the baselines, where one was measured.

Chromium refuses fetch()/XHR of local files, so the data are JavaScript files (`VISAE.put(...)`)
loaded by <script> tags; thumbnails are <img> cut out of sprite sheets and heatmaps are drawn on
canvases from quantised grids (a canvas that draws a file:// image cannot be read back, so the two
stay apart). Pages are three shared templates reading `?model=&dataset=&layer=&sae=&latent=`
rather than one generated file per latent: 24,576 latents x 4 SAEs of near-identical HTML would
be ~100,000 files and megabytes of markup for no gain; the data are split so that a latent page
loads one chunk of 64 latents and the few sprite sheets its images sit on.

browser/
  index.html, sae.html, latent.html, browser.js, browser.css   the pages (one shell, page.html; index.html last)
  data/manifest.js                                 every SAE: identity, summaries, comparisons
  data/<sae key>/table.js                          the latent table (one column array per field)
  data/<sae key>/latents_<c>.js                    64 latents: top images, heatmaps, histogram...
  images/<dataset>/sheet_<s>.png|jpg               thumbnails, each image once, <= 512 px a side
  provenance.json

Heatmaps: the latent's activation on every patch of each top image, re-encoded from the store
(reopened as the later stages do, `reopen_sources`: refused if the store or SAE changed since the
index; not `open_sae_on_store`, which re-hashes the whole store), quantised to uint8 against the
latent's maximum, `N x gh x gw` bytes per latent, zlib-deflated, base64 (the page inflates them
with the browser's DecompressionStream). Histograms: 20 equal bins on (0, max] of the index's
image-level activations, plus the images it is 0 on. Images: from the --datasets entry named like
the indexes' dataset (checked against their labels), else from the spec their store records.

Sizes. The demo (8 SAEs of 512 latents on the 1,000 held-out Fashion-MNIST images, 7x7 patches,
top 8): 3.1 MB in 83 files: the latent chunks 2.4 MB (0.4 MB of it heatmaps, deflated 3.9x),
the 1,000 images at 28 px 0.4 MB, the tables 0.3 MB; built in 9-15 s on one busy CPU core.
The paper (2 models x (SAE + second seed) = 4 indexes of 24,576 latents on 50,000 ImageNet
images, 16x16 patches, top 8), scaled from the demo's bytes per latent: heatmaps 2 KB raw per
latent, ~0.5 KB deflated as base64 if as sparse as the demo's; other detail ~0.65 KB (20 classes
charted); so ~115 MB of chunks, ~6.5 MB of tables, and at most 50,000 thumbnails at 64 px as
JPEG (1.8 KB each, measured on ImageNet images) = ~90 MB in 782 sheets of 8x8: ~210 MB in all,
of which one latent page loads ~1 MB (its chunk of 64 latents, <= 8 sheets). Its build is
dominated by re-encoding the top images' tokens through the SAE (use --device cuda) and by
decoding up to 50,000 images for the thumbnails.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from visae.args import device as device_arg, json_object, positive_int
from visae.errors import VisaeError
from visae.layout import (BROWSER_INDEX, INTERVENTION_CLASSES, MATCHES, PROFILE_LATENTS, RUN_MARKER, Identity,
                          layer_dir, model_slug)

FORMAT = "visae-browser/1"
CHUNK = 64  # latents per detail file
SHEET_PX = 512  # a sprite sheet's side at most: a latent page loads <= top sheets of this size
CLASS_BARS = 20  # per-class rates shown per latent: all classes up to this many, else the top ones
HIST_BINS = 20
JPEG_QUALITY = 90
ASSETS = ("browser.js", "browser.css")  # copied as they are
PAGE = "page.html"  # the one HTML shell of every page; browser.js renders the page its body names
PAGES = {"sae.html": ("visae · sae", "sae"), "latent.html": ("visae · latent", "latent"),
         "index.html": ("visae · latent browser", "index")}  # (title, page); index.html last
CHOSEN = ("latent", "manual")  # an intervention's chosen latents; every other method is a baseline
INTERVENTION_KEYS = ("class", "class_name", "method", "latent")


# -- inputs --------------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    from visae.report.collect import read_json

    return read_json(Path(path), what)


def _sae_file(saes, path: Path, what: str) -> tuple[dict, "Sae"]:
    """A per-SAE result file and the SAE it is of (by the identity it names)."""
    s = _read_json(path, what)
    return s, saes.find(Identity.from_file(s, f"{what} {path}"), f"{what} {path}")


def _sha256(path: Path) -> str:
    from visae.store.format import sha256_file

    return sha256_file(path)


@dataclass
class Sae:
    """One latent index and everything else given about its SAE."""

    index: object  # LatentIndex
    key: str
    path: Path
    matchings: list = field(default_factory=list)  # (Matching, side)
    profile: object = None  # DataFrame of profile_latents.csv
    profile_summary: dict | None = None
    interventions: list = field(default_factory=list)  # (summary, classes DataFrame)
    saebench: dict | None = None

    @property
    def identity(self) -> Identity:
        return self.index.identity


@dataclass
class Matching:
    """One `visae compare` output: its summary, matches.csv, and the identity of each side."""

    summary: dict
    path: Path
    rows: object  # DataFrame of matches.csv
    ident: dict  # side ("a", "b") -> Identity


def _ident_key(ident: Identity) -> tuple:
    return (ident.model, ident.dataset, layer_dir(ident.layer), ident.sae)


def sae_key(ident: Identity) -> str:
    """A folder name for an SAE's data: model, dataset, layer and SAE, slugged."""
    return "__".join(model_slug(p) for p in _ident_key(ident))


class Saes:
    """The indexes, by identity; every other input is attached to the index it names."""

    def __init__(self, index_dirs):
        from visae.analysis.latent_index import LatentIndex

        self.by_key: dict[tuple, Sae] = {}
        for d in index_dirs:
            index = LatentIndex.load(d)
            k = _ident_key(index.identity)
            if k in self.by_key:
                raise VisaeError(f"latent indexes {self.by_key[k].path} and {d} are both {index.identity.key}: "
                                 f"give each SAE's index once")
            self.by_key[k] = Sae(index=index, key=sae_key(index.identity), path=Path(d))
        keys = [s.key for s in self.by_key.values()]
        if len(set(keys)) != len(keys):
            raise VisaeError(f"two SAEs share the folder name {sorted(k for k in keys if keys.count(k) > 1)[0]!r} "
                             f"once slugged: rename one")
        self.items = [self.by_key[k] for k in sorted(self.by_key)]

    def find(self, ident: Identity, what: str, required: bool = True) -> Sae | None:
        """The index `ident` names; a stale one (another store) or a missing one refused in one line."""
        sae = self.by_key.get(_ident_key(ident))
        if sae is None:
            if required:
                raise VisaeError(f"{what} is about {ident.key}, which none of --indexes is: give its latent index")
            return None
        if sae.identity.store_hash != ident.store_hash:
            raise VisaeError(f"{what} was made on another store than latent index {ident.key} (store hash "
                             f"{ident.store_hash[:12]} vs {sae.identity.store_hash[:12]}): rerun it")
        return sae


def _checked_beside(marker: Path, name: str, recorded: str | None, rerun: str) -> Path:
    path = marker.parent / name
    if not path.is_file():
        raise VisaeError(f"{path} does not exist (beside {marker}): {rerun}")
    if recorded is not None and _sha256(path) != recorded:
        raise VisaeError(f"{path} does not match the sha256 in {marker}: {rerun}")
    return path


def attach_matchings(saes: Saes, paths) -> list[Matching]:
    from visae.report.collect import read_csv

    out = []
    for p in paths:
        p = Path(p)
        s = _read_json(p, "matching file")
        ident = {side: Identity.from_file({"identity": s.get(f"identity_{side}")}, f"matching file {p} (side {side})")
                 for side in ("a", "b")}
        csv = _checked_beside(p, MATCHES, (s.get("files_sha256") or {}).get(MATCHES), "rerun `visae compare`")
        rows = read_csv(csv, "matches file", ("latent", "match", "matched_correlation", "best_correlation",
                                              "best_partner"), text=("side",))
        m = Matching(summary=s, path=p, rows=rows, ident=ident)
        found = {side: saes.find(ident[side], f"matching file {p}", required=False) for side in ("a", "b")}
        if not any(found.values()):
            raise VisaeError(f"matching file {p} compares {ident['a'].key} with {ident['b'].key}, neither of which "
                             f"is in --indexes: give their latent indexes")
        for side, sae in found.items():
            if sae is None:
                continue
            partner = ident[_other(side)]
            if any(_ident_key(other.ident[_other(s2)]) == _ident_key(partner) for other, s2 in sae.matchings):
                raise VisaeError(f"two matchings pair {sae.identity.key} with {partner.key}: give one")
            sae.matchings.append((m, side))
        out.append(m)
    return out


def attach_profiles(saes: Saes, paths) -> None:
    from visae.report.collect import read_csv

    for p in paths:
        p = Path(p)
        s, sae = _sae_file(saes, p, "profile file")
        if sae.profile is not None:
            raise VisaeError(f"two profiles are of {sae.identity.key}: give one")
        df = read_csv(_checked_beside(p, PROFILE_LATENTS, None, "rerun `visae profile`"), "profile latents file",
                      ("latent", "purity", "lca_depth"), text=("category",))
        width = sae.index.width
        if sorted(df.latent.tolist()) != list(range(width)):
            raise VisaeError(f"{p.parent / PROFILE_LATENTS} does not list latents 0..{width - 1} of "
                             f"{sae.identity.key}: rerun `visae profile`")
        sae.profile = df.sort_values("latent").reset_index(drop=True)
        sae.profile_summary = profile_summary(s)


def _ci(block) -> dict | None:
    if not isinstance(block, dict) or block.get("value") is None:
        return None
    return {k: _num(block.get(k)) for k in ("value", "low", "high")}


def profile_summary(p: dict) -> dict:
    """The SAE-level numbers of a profile, each beside its baseline."""
    a = (p.get("abstraction") or {})
    model, chance = a.get("model") or {}, a.get("chance") or {}
    rows = [{"name": "mean purity of top images", "value": _ci(model.get("mean_purity")),
             "baseline": _ci(chance.get("mean_purity")), "baseline_label": "random latents"},
            {"name": "abstract fraction", "value": _ci(model.get("abstract_fraction")),
             "baseline": _ci(chance.get("abstract_fraction")), "baseline_label": "random latents"},
            {"name": "mean LCA depth", "value": _ci(model.get("mean_lca_depth")),
             "baseline": _ci(chance.get("mean_lca_depth")), "baseline_label": "random latents"}]
    inv = p.get("invariance") or {}
    for shift in inv.get("headline_shifts") or []:
        rows.append({"name": f"invariance to {shift}", "value": _ci(inv["shifts"][shift].get("headline")),
                     "baseline": _ci((inv.get("baseline") or {}).get("headline")), "baseline_label": "random images"})
    c = ((p.get("concepts") or {}).get("summary") or {})
    if c.get("mean_f1_single") is not None:
        rows.append({"name": "concept F1, best single latent", "value": {"value": _num(c["mean_f1_single"])},
                     "baseline": {"value": _num(c.get("mean_baseline_f1_single"))},
                     "baseline_label": "matched-frequency latents"})
    return {"rows": [r for r in rows if r["value"] is not None]}


def attach_interventions(saes: Saes, paths) -> None:
    from visae.report.collect import read_csv

    for p in paths:
        p = Path(p)
        s, sae = _sae_file(saes, p, "intervention file")
        if s.get("task") in {i[0]["task"] for i in sae.interventions}:
            raise VisaeError(f"two {s.get('task')} interventions are on {sae.identity.key}: give one")
        df = read_csv(_checked_beside(p, INTERVENTION_CLASSES, None, "rerun `visae intervene`"), "classes file",
                      ("class",), text=("class_name", "method"))
        missing = [c for c in INTERVENTION_KEYS if c not in df.columns]
        if missing:
            raise VisaeError(f"classes file {p.parent / INTERVENTION_CLASSES} lacks column(s) {', '.join(missing)}: "
                             f"rerun `visae intervene`")
        sae.interventions.append(({"task": str(s.get("task")), "dataset": s.get("dataset"),
                                   "finding": (s.get("finding") or {}).get("text"),
                                   "probe": s.get("probe")}, df))


def attach_saebench(saes: Saes, paths) -> None:
    for p in paths:
        p = Path(p)
        s, sae = _sae_file(saes, p, "saebench file")
        if sae.saebench is not None:
            raise VisaeError(f"two saebench files are of {sae.identity.key}: give one")
        metrics = s.get("metrics")
        if not isinstance(metrics, dict):
            raise VisaeError(f"saebench file {p} has no 'metrics' block: rerun `visae saebench`")
        sae.saebench = saebench_rows(metrics)


def saebench_rows(metrics: dict) -> list[dict]:
    """Each SAEBench metric beside its baseline (`<m>_random`, a probe's floor and ceiling)."""
    import re

    baselines = {k for k in metrics if k.endswith(("_random", "_std")) or k.startswith("sparse_probing_floor_")
                 or k == "sparse_probing_ceiling"}
    rows = []
    def k_of(name):  # sparse_probing_k5 before sparse_probing_k20
        m = re.fullmatch(r"sparse_probing_k(\d+)", name)
        return int(m.group(1)) if m else 0

    for k in sorted(metrics, key=lambda k: (_metric_order(k), k_of(k), k)):
        if k in baselines:
            continue
        row = {"name": k, "value": _num(metrics[k])}
        probe = re.fullmatch(r"sparse_probing_k(\d+)", k)
        if probe:
            row["baseline"] = _num(metrics.get(f"sparse_probing_floor_k{probe.group(1)}"))
            row["baseline_label"] = "floor"
            row["ceiling"] = _num(metrics.get("sparse_probing_ceiling"))
        elif f"{k}_random" in metrics:
            row["baseline"] = _num(metrics[f"{k}_random"])
            row["baseline_label"] = "random"
        if metrics.get(f"{k}_std") is not None:  # the spread over classes (TPP)
            row["std"] = _num(metrics[f"{k}_std"])
        rows.append(row)
    return rows


def _metric_order(k: str) -> int:
    for i, stem in enumerate(("l0", "sparse_probing", "tpp", "absorption", "shrinkage", "stability")):
        if k.startswith(stem):
            return i
    return 99


# -- numbers -------------------------------------------------------------------------------------

def _num(x, digits: int = 4):
    """A float rounded to `digits` significant digits (JSON-stable), None for NaN/None/inf."""
    if x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _nums(values, digits: int = 4) -> list:
    return [_num(v, digits) for v in values]


def quantise(heat, scale):
    """uint8 heatmaps: round(255 * value / scale), clipped to [0, 255]; scale <= 0 gives zeros."""
    import numpy as np

    scale = np.asarray(scale, dtype=np.float64).reshape(-1, *([1] * (heat.ndim - 1)))
    q = np.where(scale > 0, np.rint(255.0 * np.asarray(heat, dtype=np.float64) / np.where(scale > 0, scale, 1)), 0)
    return np.clip(q, 0, 255).astype(np.uint8)


def histograms(index, bins: int = HIST_BINS):
    """[h, bins] counts of each latent's non-zero image-level activations on `bins` equal bins of
    (0, max activation], and [h] the images it is zero on."""
    import numpy as np

    acts = index.acts.tocsc()
    h, n = index.width, acts.shape[0]
    counts = np.zeros((h, bins), dtype=np.int64)
    for j in range(h):
        values = acts.data[acts.indptr[j]:acts.indptr[j + 1]]
        if len(values):
            top = max(float(index.max_activation[j]), float(values.max()))
            counts[j] = np.histogram(values, bins=bins, range=(0.0, top))[0]
    zeros = n - np.diff(acts.indptr)
    return counts, zeros


def heatmaps(index, top: int, device: str = "cpu", chunk_floats: int = 1 << 25):
    """[h, top, gh, gw] float32: each latent's activation on every patch of its top images,
    re-encoded from the store (pads zero). The store and SAE are reopened as the index recorded
    them, refused if either changed since."""
    import numpy as np
    import torch

    from visae.analysis.latent_index import pooled_tokens, reopen_sources

    store, sae = reopen_sources(index)
    sae = sae.to(device)
    tokens, kind = pooled_tokens(store)
    gh, gw = store.layout.grid if kind == "patches" else (1, 1)
    h = index.width
    images = index.top_images[:, :top]
    out = np.zeros((h, top, gh * gw), dtype=np.float32)
    lat, rank = np.nonzero(images >= 0)
    img = images[lat, rank]
    order = np.argsort(img, kind="stable")
    lat, rank, img = lat[order], rank[order], img[order]
    unique = np.unique(img)
    step = max(1, chunk_floats // max(1, len(tokens) * h))
    with torch.no_grad():
        for lo in range(0, len(unique), step):
            chunk = unique[lo:lo + step]
            x = store.take(chunk, tokens).to(device=device, dtype=torch.float32)
            f = sae.encode(x.reshape(-1, sae.d_model)).reshape(len(chunk), len(tokens), h)
            a, b = np.searchsorted(img, chunk[0]), np.searchsorted(img, chunk[-1], side="right")
            pos = torch.from_numpy(np.searchsorted(chunk, img[a:b])).to(device)
            picked = f[pos, :, torch.from_numpy(lat[a:b]).to(device)]  # [pairs, patches]: only these leave the device
            out[lat[a:b], rank[a:b]] = picked.cpu().numpy()
    return out.reshape(h, top, gh, gw)


# -- images --------------------------------------------------------------------------------------

def _dataset_entries(texts) -> dict[str, dict]:
    entries = {}
    for t in texts:
        e = t if isinstance(t, dict) else json_object(t, "--datasets")
        if not isinstance(e.get("name"), str) or not e["name"]:
            raise VisaeError(f"--datasets entry {json.dumps(e)} has no 'name'")
        if e["name"] in entries:
            raise VisaeError(f"--datasets names {e['name']!r} twice")
        entries[e["name"]] = e
    return entries


def image_source(name: str, image_set: dict, entry: dict | None, index):
    """`load(store image i) -> PIL image`, from the --datasets entry of that name (checked: the
    same labels in the same order as the indexes' store), else from the spec the store records;
    None when neither holds images (a `visae synth` store)."""
    import numpy as np

    from visae.analysis.invariance import image_loader, store_to_dataset_index

    if entry is None:
        from visae.store import ActivationStore

        store = ActivationStore(index.meta["store"])
        return image_loader(store) if isinstance(store.info.dataset, dict) else None
    from visae.data import open_dataset

    spec = image_set.get("dataset") or {}
    differs = [k for k in spec if k != "root" and entry.get(k) != spec[k]]
    if differs:
        raise VisaeError(f"--datasets entry {name!r} has {', '.join(f'{k}={entry.get(k)!r}' for k in differs)}, but "
                         f"the indexes were built on {', '.join(f'{k}={spec[k]!r}' for k in differs)}")
    dataset = open_dataset(entry)
    n = int(image_set["n_images"])
    dataset_index = store_to_dataset_index(n, [{"index": s} for s in image_set.get("skipped") or []])
    labels = dataset.label_array()
    if len(labels) <= int(dataset_index[-1]) or hashlib.sha256(np.ascontiguousarray(
            labels[dataset_index], dtype=np.int64).tobytes()).hexdigest() != image_set.get("labels_sha256"):
        raise VisaeError(f"--datasets entry {name!r} holds other images than the store the indexes were built on "
                         f"(its labels differ): point its root at the data that was extracted")
    return lambda i: dataset[int(dataset_index[int(i)])].image


def thumbnails(load, images, thumb: int):
    """(cell px, [n, cell, cell, 3] uint8): centre-cropped squares of at most `thumb` px, never
    upscaled past the largest image's shorter side (a 28 px image stays 28 px; CSS scales it)."""
    import numpy as np
    from PIL import Image, ImageOps

    if load is None:
        return 8, np.full((len(images), 8, 8, 3), 96, dtype=np.uint8)
    fitted = []
    for i in images:
        img = load(int(i)).convert("RGB")
        side = min(thumb, *img.size)
        fitted.append(ImageOps.fit(img, (side, side), method=Image.Resampling.LANCZOS))
    cell = max((im.size[0] for im in fitted), default=8)
    return cell, np.stack([np.asarray(im if im.size[0] == cell else im.resize((cell, cell), Image.Resampling.LANCZOS))
                           for im in fitted]) if fitted else np.zeros((0, cell, cell, 3), np.uint8)


def sheet_side(cell: int) -> int:
    """Thumbnails per side of a sprite sheet: as many as fit in SHEET_PX, 1..16."""
    return max(1, min(16, SHEET_PX // cell))


def write_sheets(out_dir: Path, thumbs, cell: int, image_format: str) -> tuple[list[str], str]:
    """Sprite sheets of side x side thumbnails (`sheet_side`) in image order; grey images as one
    channel. PNG for grey images, JPEG for colour ones under 'auto'."""
    import numpy as np
    from PIL import Image

    grey = bool(len(thumbs)) and bool((thumbs[..., 0] == thumbs[..., 1]).all() and
                                      (thumbs[..., 1] == thumbs[..., 2]).all())
    fmt = image_format if image_format != "auto" else ("png" if grey else "jpeg")
    side = sheet_side(cell)
    per = side * side
    names = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(thumbs), per):
        part = thumbs[s:s + per]
        rows = math.ceil(len(part) / side)
        cols = min(len(part), side)
        sheet = np.zeros((rows * cell, cols * cell, 3), dtype=np.uint8)
        for k, t in enumerate(part):
            r, c = divmod(k, side)
            sheet[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = t
        im = Image.fromarray(sheet[..., 0] if grey else sheet, "L" if grey else "RGB")
        name = f"sheet_{s // per:03d}.{'png' if fmt == 'png' else 'jpg'}"
        if fmt == "png":
            im.save(out_dir / name, format="PNG", optimize=True)
        else:
            im.save(out_dir / name, format="JPEG", quality=JPEG_QUALITY, optimize=True)
        names.append(name)
    return names, fmt


# -- emitted data --------------------------------------------------------------------------------

def _js(name: str, obj) -> str:
    return f"VISAE.put({json.dumps(name)}, {json.dumps(obj, sort_keys=True, separators=(',', ':'))});\n"


def _write(path: Path, text: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    path.write_bytes(data)
    return len(data)


def _other(side: str) -> str:
    return "b" if side == "a" else "a"


def _pair_label(m: Matching, side: str) -> str:
    """What the pages call the other side: its model (and SAE, layer where they differ), or the seed twin."""
    mine, other = m.ident[side], m.ident[_other(side)]
    if (mine.model, mine.layer) == (other.model, other.layer):
        return "seed twin" if other.sae.startswith(mine.sae) or mine.sae.startswith(other.sae) else other.sae
    extra = [f"layer {other.layer}"] * (other.layer != mine.layer) + [other.sae] * (other.sae != mine.sae)
    return " ".join([other.model, *extra])


def comparisons(sae: Sae, saes: Saes) -> list[dict]:
    """The SAE's matchings as the pages show them: cross-model ones first, then the seed pairs."""
    out = []
    for m, side in sae.matchings:
        other = m.ident[_other(side)]
        partner = saes.find(other, f"matching file {m.path}", required=False)
        s = m.summary
        mine = m.ident[side]
        cross = (mine.model, mine.layer) != (other.model, other.layer)
        out.append({"label": _pair_label(m, side), "kind": s.get("kind"), "cross_model": cross,
                    "other": partner.key if partner else None, "other_identity": other.to_dict(),
                    "threshold": _num(s.get("threshold")), "images": s.get("images"),
                    "matched_fraction": _num(s.get(f"matched_fraction_{side}")),
                    "null_matched_fraction": _num(s.get(f"null_matched_fraction_{side}")),
                    "mean_matched_correlation": _num(s.get("mean_match_correlation")),
                    "null_mean_matched_correlation": _num(s.get("null_mean_match_correlation")),
                    "_rows": m.rows[m.rows.side == side].sort_values("latent")})
    out.sort(key=lambda c: (not c["cross_model"], c["label"]))
    return out


def top_classes(index, top: int) -> tuple[list, list]:
    """Per latent the most common class among its top images and that class's share."""
    import numpy as np

    labels = index.top_labels[:, :top]
    names = index.classes
    cls, share = [], []
    for row in labels:
        row = row[row >= 0]
        if not len(row):
            cls.append(None)
            share.append(None)
            continue
        counts = np.bincount(row, minlength=len(names))
        c = int(counts.argmax())
        cls.append(names[c] if c < len(names) else str(c))
        share.append(_num(counts[c] / len(row)))
    return cls, share


def invariance_columns(profile) -> list[str]:
    return [c for c in profile.columns if c.startswith("invariance_") and c not in ("invariance_baseline",
                                                                                   "invariance_n_valid")]


def chosen_latents(sae: Sae) -> dict[int, list[dict]]:
    """latent -> the interventions that chose it: per (task, class) every method's numbers."""
    out: dict[int, list[dict]] = {}
    for summary, df in sae.interventions:
        metrics = [c for c in df.columns if c not in INTERVENTION_KEYS]
        for cls, rows in df.groupby("class", sort=True):
            methods = {}
            for _, r in rows.iterrows():
                methods[str(r["method"])] = {"latent": None if _num(r["latent"]) is None else int(r["latent"]),
                                             **{c: _num(r[c]) for c in metrics}}
            for method in CHOSEN:
                if method in methods and methods[method]["latent"] is not None:
                    out.setdefault(methods[method]["latent"], []).append(
                        {"task": summary["task"], "dataset": summary["dataset"], "class": int(cls),
                         "class_name": str(rows["class_name"].iloc[0]), "chosen": method, "metrics": metrics,
                         "order": sorted(methods, key=lambda m: (m not in CHOSEN, m != method)), "methods": methods})
    return out


def table(sae: Sae, comps: list[dict], top: int, chosen: dict, top_class: tuple[list, list]) -> dict:
    """The latent table: one array per column, the columns described for the page."""
    import numpy as np

    idx = sae.index
    h = idx.width
    cols, data = [], {}

    def add(cid, label, kind, values, help_text, **extra):
        cols.append({"id": cid, "label": label, "type": kind, "help": help_text, **extra})
        data[cid] = values

    add("latent", "latent", "int", list(range(h)), "the latent's number; opens its page")
    add("frequency", "frequency", "float", _nums(idx.frequency),
        f"fraction of the {len(idx.images)} indexed images it fires on")
    add("max_activation", "max act.", "float", _nums(idx.max_activation), "its largest image-level activation")
    cls, share = top_class
    add("top_class", "top class", "text", cls, f"the most common class of its top {top} images")
    add("top_class_share", "share", "float", share, f"that class's share of its top {top} images",
        hidden=sae.profile is not None)  # the profile's purity says the same over the index's top images
    if sae.profile is not None:
        p = sae.profile
        add("purity", "purity", "float", _nums(p.purity),
            f"share of its top {idx.top_images.shape[1]} images in their most common class")
        add("lca_depth", "LCA depth", "float", _nums(p.lca_depth),
            "depth of the lowest common ancestor of its top images' classes in the hierarchy")
        if "category" in p:
            add("category", "category", "text", [None if not isinstance(v, str) else v for v in p.category],
                "specific / abstract / mixed / too_few (see profile.json)")
        inv = invariance_columns(p)
        if inv:
            mean = p[inv].mean(axis=1, skipna=True) if len(inv) else None
            add("invariance", "invariance", "float", _nums(mean),
                f"mean over {', '.join(c.removeprefix('invariance_') for c in inv)} of the share of its top images "
                f"it still fires on, strongly, when shifted")
            if "invariance_baseline" in p:
                add("invariance_baseline", "inv. baseline", "float", _nums(p.invariance_baseline),
                    "how often it fires that strongly on random images anyway")
    for i, c in enumerate(comps):
        rows = c["_rows"]
        match = np.full(h, -1, dtype=np.int64)
        r = np.full(h, np.nan)
        match[rows.latent.to_numpy()] = rows["match"].fillna(-1).to_numpy(dtype=np.int64)
        r[rows.latent.to_numpy()] = rows.matched_correlation.to_numpy(dtype=np.float64)
        add(f"match_r_{i}", f"r {c['label']}", "float", _nums(r),
            f"correlation with its one-to-one match in {c['label']} ({c['other_identity']['model']} "
            f"{c['other_identity']['sae']}; matched above {c['threshold']}); the arrow opens the match",
            link={"comparison": i, "latent": f"match_{i}"})
        data[f"match_{i}"] = [int(v) for v in match]
    if sae.interventions:
        add("intervened", "intervened for", "text",
            [", ".join(f"{e['class_name']} ({e['task']})" for e in chosen.get(j, [])) or None for j in range(h)],
            "the classes whose intervention chose this latent")
    return {"columns": cols, "data": data, "rows": h}


def shown_classes(index, lo: int, hi: int) -> list[list[int]]:
    """Per latent the classes its page charts: all of them up to CLASS_BARS classes, else the
    CLASS_BARS it fires on most (of those it fires on at all), by class index."""
    import numpy as np

    freq = index.class_frequency[lo:hi]
    if freq.shape[1] <= CLASS_BARS:
        return [list(range(freq.shape[1]))] * (hi - lo)
    out = []
    for row in freq:
        order = np.argsort(-row, kind="stable")[:CLASS_BARS]
        out.append(sorted(int(c) for c in order if row[c] > 0))
    return out


def chunk(sae: Sae, comps: list[dict], lo: int, hi: int, heat_q, hist, zeros, slots, top: int,
          chosen: dict, top_class: tuple[list, list]) -> dict:
    """The detail of latents lo..hi-1: all a latent page draws."""
    import numpy as np

    idx = sae.index
    images = idx.top_images[lo:hi, :top]
    slot = np.where(images >= 0, slots(images), -1)
    classes = shown_classes(idx, lo, hi)
    detail = {"start": lo, "count": hi - lo, "top": top, "grid": list(heat_q.shape[2:]),
              "frequency": _nums(idx.frequency[lo:hi]), "max_activation": _nums(idx.max_activation[lo:hi]),
              "top_class": top_class[0][lo:hi], "top_class_share": top_class[1][lo:hi],
              "images": images.tolist(), "slots": slot.tolist(),
              "values": [_nums(v) for v in idx.top_values[lo:hi, :top]],
              "patch": idx.top_patch[lo:hi, :top].tolist(), "labels": idx.top_labels[lo:hi, :top].tolist(),
              "heat": base64.b64encode(zlib.compress(np.ascontiguousarray(heat_q[lo:hi]).tobytes(), 9)).decode(),
              "hist": hist[lo:hi].tolist(), "zeros": [int(z) for z in zeros[lo:hi]],
              "classes": classes,
              "class_frequency": [_nums(idx.class_frequency[lo + i, c], 3) for i, c in enumerate(classes)],
              "class_mean": [_nums(idx.class_mean[lo + i, c], 3) for i, c in enumerate(classes)]}
    if sae.profile is not None:
        p = sae.profile.iloc[lo:hi]
        keep = [c for c in ("purity", "coarse_purity", "entropy_bits", "n_classes", "lca_depth", "category")
                if c in p.columns] + invariance_columns(sae.profile) + \
            [c for c in ("invariance_baseline", "invariance_n_valid") if c in p.columns]
        detail["profile"] = {c: [v if isinstance(v, str) else _num(v) for v in p[c]] for c in keep}
    detail["matches"] = []
    for c in comps:  # per comparison, columns over latents lo..hi-1 (-1 / null: no partner)
        rows = c["_rows"].set_index("latent").reindex(range(lo, hi))
        detail["matches"].append({"match": [int(v) for v in rows["match"].fillna(-1)],
                                  "r": _nums(rows["matched_correlation"]),
                                  "best": [int(v) for v in rows["best_partner"].fillna(-1)],
                                  "best_r": _nums(rows["best_correlation"])})
    detail["interventions"] = [chosen.get(j, []) for j in range(lo, hi)]
    return detail


def manifest_entry(sae: Sae, comps: list[dict], dataset_key: str, top: int, grid) -> dict:
    idx, ident = sae.index, sae.identity
    m = idx.meta
    return {"key": sae.key, "identity": ident.to_dict(), "model": ident.model, "dataset": ident.dataset,
            "layer": str(ident.layer), "sae": ident.sae, "architecture": m.get("architecture"), "width": idx.width,
            "entry": {k: m.get("entry", {}).get(k) for k in ("k", "l1", "expansion", "lr") if
                      isinstance(m.get("entry"), dict) and k in m["entry"]},
            "images": len(idx.images), "top": top, "grid": list(grid), "classes": idx.classes,
            "chunk": CHUNK, "chunks": math.ceil(idx.width / CHUNK), "image_set": dataset_key,
            "alive_fraction": _num(m.get("summary", {}).get("alive_fraction")),
            "density": _num(m.get("summary", {}).get("density")),
            "comparisons": [{k: v for k, v in c.items() if not k.startswith("_")} for c in comps],
            "profile": sae.profile_summary, "saebench": sae.saebench,
            "interventions": [s for s, _ in sae.interventions]}


# -- the build -----------------------------------------------------------------------------------

def shown_top(sae: Sae, top: int) -> int:
    """Top images shown per latent: `--top`, or fewer when the index kept fewer."""
    return min(top, sae.index.top_images.shape[1])


def write_image_sets(saes: Saes, entries: dict, args, tmp: Path, sizes: dict) -> tuple[dict, dict]:
    """Per image set (the indexes' dataset), each image any SAE shows, once, in store order, in
    sprite sheets; returns (the manifest's image_sets, dataset -> the images in slot order)."""
    import numpy as np

    from visae.analysis.compare import check_same_images

    by_set: dict[str, list[Sae]] = {}
    for sae in saes.items:
        by_set.setdefault(sae.identity.dataset, []).append(sae)
    sets, slots = {}, {}
    for name, members in sorted(by_set.items()):
        first = members[0].index
        for other in members[1:]:
            check_same_images(first.meta["image_set"], other.index.meta["image_set"], f"index {first.identity.key}",
                              f"index {other.identity.key}")
        shown = np.unique(np.concatenate([s.index.top_images[:, :shown_top(s, args.top)].reshape(-1)
                                          for s in members]))
        shown = shown[shown >= 0]
        load = image_source(name, first.meta["image_set"], entries.get(name), first)
        cell, thumbs = thumbnails(load, shown, args.thumb)
        key = model_slug(name)
        names, fmt = write_sheets(tmp / "images" / key, thumbs, cell, args.image_format)
        for n in names:
            sizes[f"images/{key}/{n}"] = (tmp / "images" / key / n).stat().st_size
        sets[name] = {"key": key, "cell": cell, "side": sheet_side(cell), "format": fmt, "images": int(len(shown)),
                      "sheets": [f"images/{key}/{n}" for n in names], "has_images": load is not None}
        slots[name] = shown
    return sets, slots


def write_sae(sae: Sae, saes: Saes, shown, args, tmp: Path, sizes: dict) -> dict:
    """An SAE's table and detail chunks; returns its manifest entry."""
    import numpy as np

    idx = sae.index
    top = shown_top(sae, args.top)
    comps = comparisons(sae, saes)
    heat = heatmaps(idx, top, device=args.device)
    heat_q = quantise(heat.reshape(idx.width, -1), idx.max_activation).reshape(heat.shape)
    hist, zeros = histograms(idx)
    chosen, top_class = chosen_latents(sae), top_classes(idx, top)
    base = tmp / "data" / sae.key
    sizes[f"data/{sae.key}/table.js"] = _write(base / "table.js",
                                               _js(f"table/{sae.key}", table(sae, comps, top, chosen, top_class)))
    for c in range(math.ceil(idx.width / CHUNK)):
        lo, hi = c * CHUNK, min(idx.width, (c + 1) * CHUNK)
        d = chunk(sae, comps, lo, hi, heat_q, hist, zeros, lambda im: np.searchsorted(shown, im), top, chosen,
                  top_class)
        name = f"latents_{c:03d}.js"
        sizes[f"data/{sae.key}/{name}"] = _write(base / name, _js(f"latents/{sae.key}/{c}", d))
    print(f"{sae.identity.key}: {idx.width} latents, top {top}")
    return manifest_entry(sae, comps, sae.identity.dataset, top, heat.shape[2:])


def build(args, tmp: Path) -> dict:
    """The browser's data and images into `tmp`; returns {relative path: bytes written}."""
    saes = Saes(args.indexes)
    attach_matchings(saes, args.matchings)
    attach_profiles(saes, args.profiles)
    attach_interventions(saes, args.interventions)
    attach_saebench(saes, args.saebench)
    sizes: dict[str, int] = {}
    sets, slots = write_image_sets(saes, _dataset_entries(args.datasets), args, tmp, sizes)
    manifest = {"format": FORMAT, "image_sets": sets,
                "saes": [write_sae(sae, saes, slots[sae.identity.dataset], args, tmp, sizes) for sae in saes.items]}
    sizes["data/manifest.js"] = _write(tmp / "data" / "manifest.js", _js("manifest", manifest))
    return sizes


def _assets():
    return resources.files("visae.report") / "browser_assets"


def _clean_stale(out: Path) -> None:
    """Temporary build folders a killed run left beside `out` (`.<name>.*.tmp`)."""
    for p in out.parent.glob(f".{out.name}.*.tmp"):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def write_browser(args) -> dict:
    """Build into a temporary folder beside `--out`, then swap it into place; a failed run leaves
    no index.html under `--out` (the marker of a finished browser)."""
    from visae.atomic import write_json
    from visae.provenance import provenance

    started = time.time()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out)
    (out / BROWSER_INDEX).unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        sizes = build(args, tmp)
        config = {"command": "report browser", **{k: [str(p) for p in getattr(args, k)] for k in
                                                  ("indexes", "matchings", "profiles", "interventions", "saebench",
                                                   "datasets")},
                  "top": args.top, "thumb": args.thumb, "image_format": args.image_format}
        write_json(tmp / RUN_MARKER, provenance(config, seeds={}, started=started))
        for name in (*ASSETS, PAGE):
            if not (_assets() / name).is_file():
                raise VisaeError(f"visae's install lacks its browser page {name} (visae/report/browser_assets): "
                                 f"reinstall visae")
        files = {name: (_assets() / name).read_bytes() for name in ASSETS}
        shell = (_assets() / PAGE).read_text(encoding="utf-8")
        files |= {name: shell.format(title=title, page=page).encode() for name, (title, page) in PAGES.items()}
        for name, data in files.items():  # index.html last: it marks the browser done
            (tmp / name).write_bytes(data)
            sizes[name] = len(data)
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
            os.rmdir(old)
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sizes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def run(args) -> int:
    started = time.time()
    sizes = write_browser(args)
    total = sum(sizes.values())
    parts = {"heatmaps and details": sum(v for k, v in sizes.items() if "/latents_" in k),
             "images": sum(v for k, v in sizes.items() if k.startswith("images/")),
             "tables": sum(v for k, v in sizes.items() if k.endswith("table.js"))}
    print(f"browser: {len(sizes)} files, {_mb(total)} (" + ", ".join(f"{k} {_mb(v)}" for k, v in parts.items())
          + f") in {time.time() - started:.1f} s -> {Path(args.out) / BROWSER_INDEX}")
    return 0


def add_arguments(parser) -> None:
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    parser.add_argument("--indexes", nargs="+", required=True, metavar="DIR",
                        help="latent index folders (`visae latents`): every SAE with one gets pages")
    parser.add_argument("--matchings", nargs="*", default=[], metavar="MATCHING_JSON",
                        help="`visae compare` outputs (matches.csv beside): each latent's match, linked")
    parser.add_argument("--profiles", nargs="*", default=[], metavar="PROFILE_JSON",
                        help="`visae profile` outputs (profile_latents.csv beside): abstraction, invariance")
    parser.add_argument("--interventions", nargs="*", default=[], metavar="INTERVENTION_JSON",
                        help="`visae intervene` outputs (classes.csv beside): the chosen latents' effects")
    parser.add_argument("--saebench", nargs="*", default=[], metavar="SAEBENCH_JSON",
                        help="`visae saebench` outputs: per-SAE summary numbers")
    parser.add_argument("--datasets", nargs="*", default=[], metavar="ENTRY_JSON",
                        help="dataset entries as JSON objects with a name, e.g. '{\"name\":\"fmnist-test\","
                             "\"format\":\"fashion-mnist\",\"root\":\"...\",\"split\":\"test\"}'; "
                             "the images of an index's dataset come from the entry of that name (else from the "
                             "spec its store records)")
    parser.add_argument("--top", type=positive_int, default=8, help="top images shown per latent")
    parser.add_argument("--thumb", type=positive_int, default=64,
                        help="thumbnail side in pixels (never larger than the images)")
    parser.add_argument("--image-format", choices=("auto", "png", "jpeg"), default="auto",
                        help="sprite sheets' format; auto: PNG for grey images, JPEG for colour")
    parser.add_argument("--device", type=device_arg, default="cpu", help="where the heatmaps are re-encoded")
    parser.add_argument("--out", required=True, help="output folder (results/browser)")
