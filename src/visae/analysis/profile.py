"""`visae profile`: what one SAE's latents are about, each number beside its baseline.

From the SAE's latent index (`visae latents`):
- abstraction (visae.analysis.abstraction): per latent, the class purity, entropy and number of
  classes of its top images, whether it is specific, abstract or mixed under the class hierarchy
  (the config's groups, WordNet for ImageNet-1k, or none: every class its own group), and the
  depth of their lowest common ancestor; beside random latents drawn from the same images;
- concept probe (visae.analysis.concepts): per class, the F1 of the best latent and of the best
  five, against latents of matched firing frequency;
- invariance (visae.analysis.invariance): a seeded sample of live latents, their top images under
  domain shifts re-run through the model, against random other images; and with a domain dataset
  (ImageNet-R, -Sketch: the same classes as other renditions), how often each latent fires on its
  dominant class's images there, against the domain's other classes.

Writes `profile_latents.csv` (one row per latent), `concepts.csv` (one row per class) and
`profile.json` (the summaries; last, it marks the profile done).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

from visae.analysis.latent_index import LatentIndex, reopen_sources
from visae.args import device as device_arg, json_object, nonneg_int, positive_int, unit_fraction
from visae.atomic import atomic_path, clean_stale_temps, write_json
from visae.errors import VisaeError
from visae.layout import CONCEPTS, PROFILE, PROFILE_LATENTS, RUN_MARKER



def build_hierarchy(classes: list[str], spec: dict | None):
    """The class hierarchy the config names: {groups: {...}}, {wordnet: dir, coarse_depth: n}, or
    none (each class its own group, so no latent can be abstract)."""
    from visae.data.hierarchy import Hierarchy

    spec = spec or {}
    if "groups" in spec:
        return Hierarchy.from_groups(classes, spec["groups"])
    if "wordnet" in spec:
        kw = {"coarse_depth": spec["coarse_depth"]} if "coarse_depth" in spec else {}
        return Hierarchy.from_wordnet(classes, spec["wordnet"], **kw)
    return Hierarchy.flat(classes)


def invariance_sample(index: LatentIndex, n: int, seed: int) -> np.ndarray:
    """Up to `n` live latents, a seeded sample, ascending."""
    alive = np.flatnonzero(index.alive)
    if len(alive) <= n:
        return alive
    return np.sort(np.random.default_rng([seed, 0x1A]).choice(alive, n, replace=False))


def class_key(name: str) -> str:
    """What makes two datasets' classes the same class: the WordNet id if the name has one
    (`n01440764`, `n01440764_tench`), else the name itself."""
    from visae.data.hierarchy import WNID

    match = WNID.match(str(name))
    return match.group(0) if match else str(name)


def domain_sample(classes: list[str], domain, max_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(domain dataset indices, their labels as the store dataset's class ids): a seeded sample of
    at most `max_images` of the domain images whose class the store dataset has."""
    ours = {class_key(c): i for i, c in enumerate(classes)}
    mapping = np.array([ours.get(class_key(c), -1) for c in domain.classes], dtype=np.int64)
    if (mapping < 0).all():
        raise VisaeError(f"domain dataset {domain.name} shares no class with the compared dataset "
                         f"(e.g. {domain.classes[0]!r} vs {classes[0]!r}): give a rendition set of the same classes")
    labels = mapping[domain.label_array()]
    keep = np.flatnonzero(labels >= 0)
    if len(keep) > max_images:
        keep = np.sort(np.random.default_rng([seed, 0xD0]).choice(keep, max_images, replace=False))
    return keep, labels[keep]


def profile(index_dir, *, hierarchy: dict | None = None, shifts=(), invariance_latents: int = 512,
            threshold: float = 0.5, seed: int = 0, weights=None, model_spec: dict | None = None,
            domain: dict | None = None, domain_images: int = 2000,
            device: str = "cpu") -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(profile.json's content, the per-latent table, the per-class table)."""
    from visae.analysis.abstraction import latent_abstraction, summarize_abstraction
    from visae.analysis.concepts import concept_probe

    index = LatentIndex.load(index_dir)
    tree = build_hierarchy(index.classes, hierarchy)
    # a latent is classified from at least 5 top images (fewer when the index keeps fewer)
    per_latent = latent_abstraction(index.top_labels, tree, min_images=min(5, max(1, index.top_images.shape[1])))
    abstraction = summarize_abstraction(per_latent, index.labels, tree, seed=seed)
    latents = pd.DataFrame({"latent": np.arange(index.width), "frequency": index.frequency,
                            "max_activation": index.max_activation, **per_latent.columns()})
    probe = concept_probe(index.acts, index.labels, len(index.classes), seed=seed)
    concepts = pd.DataFrame(probe["rows"])
    if "class" in concepts:
        concepts.insert(1, "class_name", [index.classes[c] for c in concepts["class"]])
    result = {"identity": index.identity.to_dict(), "index": str(index_dir), "images": len(index.images),
              "width": index.width, "alive_fraction": float(index.alive.mean()), "classes": index.classes,
              "abstraction": abstraction, "concepts": {"summary": probe["summary"], "settings": probe["settings"]},
              "invariance": None, "domain": None}
    if shifts or domain:
        from visae.analysis.invariance import domain_invariance, encoder_from_store, invariance

        sample = invariance_sample(index, invariance_latents, seed)
        store, sae = reopen_sources(index)
        encode, load_image = encoder_from_store(store, sae.to(device), weights=weights, device=device,
                                                model_spec=model_spec)
    if domain:
        from visae.data import open_dataset

        dataset = open_dataset(domain)
        picked, labels = domain_sample(index.classes, dataset, domain_images, seed)
        tops = np.full_like(index.top_labels, -1)
        tops[sample] = index.top_labels[sample]
        dom = domain_invariance(encode, lambda i: dataset[int(picked[i])].image, labels, tops, index.top_values,
                                threshold=threshold, seed=seed, batch_size=256)
        result["domain"] = {"dataset": dataset.name, "images": len(picked), "latents": len(sample),
                            "headline": dom["headline"], "baseline": dom["baseline_headline"],
                            "rule": "fraction of the domain's images of the latent's dominant class (its top images') "
                                    "on which it fires at >= threshold x its median top-image activation; baseline: "
                                    "the same on the domain's other classes"}
        latents["domain"] = dom["scores"]
        latents["domain_baseline"] = dom["baseline"]
    if shifts:
        top_images = np.full_like(index.top_images, -1)  # latents outside the sample: no images to score
        top_values = np.zeros_like(index.top_values)
        top_images[sample], top_values[sample] = index.top_images[sample], index.top_values[sample]
        inv = invariance(encode, load_image, top_images, top_values, shifts=list(shifts), threshold=threshold,
                         baseline_images=index.images, seed=seed, batch_size=256)
        result["invariance"] = {**inv.summary(), "latents": len(sample), "sampled_from": int(index.alive.sum())}
        for name, column in inv.per_latent().items():
            latents[f"invariance_{name}"] = column
    return result, latents, concepts


def write_profile(out, result: dict, latents: pd.DataFrame, concepts: pd.DataFrame, config: dict,
                  started: float) -> None:
    from visae.provenance import provenance

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out)
    (out / PROFILE).unlink(missing_ok=True)
    identity = result["identity"]
    for name, frame in ((PROFILE_LATENTS, latents), (CONCEPTS, concepts)):
        lead = pd.DataFrame({k: [v] * len(frame) for k, v in identity.items()})
        with atomic_path(out / name) as tmp:
            pd.concat([lead, frame.reset_index(drop=True)], axis=1).to_csv(tmp, index=False, float_format="%.6g")
    write_json(out / RUN_MARKER, provenance(config, seeds={"profile": config["seed"]}, started=started))
    write_json(out / PROFILE, result)



def cmd_profile(args) -> int:
    started = time.time()
    hierarchy = json_object(args.hierarchy_json, "--hierarchy-json")
    model = json_object(args.model, "--model") if args.model else None
    domain = json_object(args.domain_json, "--domain-json") if args.domain_json else None
    result, latents, concepts = profile(args.index, hierarchy=hierarchy, shifts=args.shifts,
                                        invariance_latents=args.invariance_latents, threshold=args.threshold,
                                        seed=args.seed, weights=args.weights, model_spec=model, domain=domain,
                                        domain_images=args.domain_images, device=args.device)
    config = {"index": str(args.index), "hierarchy": hierarchy, "shifts": list(args.shifts), "model": model,
              "domain": domain, "domain_images": args.domain_images,
              "weights": args.weights, "invariance_latents": args.invariance_latents, "threshold": args.threshold,
              "seed": args.seed}
    write_profile(args.out, result, latents, concepts, config, started)
    a = result["abstraction"]["model"]
    print(f"{result['identity']['sae']}: purity {a['mean_purity']['value']:.3f} "
          f"(chance {result['abstraction']['chance']['mean_purity']['value']:.3f}), "
          f"abstract {a['abstract_fraction']['value']:.3f} -> {args.out}")
    return 0


def add_cli(subparsers) -> None:
    from visae.analysis.invariance import SHIFTS

    p = subparsers.add_parser("profile", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--index", required=True, help="the SAE's latent index folder (`visae latents`)")
    p.add_argument("--out", required=True)
    p.add_argument("--hierarchy-json", default="{}",
                   help='{"groups": {group: [class, ...]}} or {"wordnet": DIR, "coarse_depth": N}; {} = none')
    p.add_argument("--shifts", nargs="*", default=list(SHIFTS), choices=list(SHIFTS),
                   help="domain shifts of the invariance test (none: skip it)")
    p.add_argument("--invariance-latents", type=positive_int, default=512)
    p.add_argument("--threshold", type=unit_fraction, default=0.5,
                   help="invariance: still fires at this fraction of its original activation")
    p.add_argument("--model", default=None, help="the model's config entry as JSON (its preprocessing settings)")
    p.add_argument("--weights", default=None, help="the model's weights file (a `visae pretrain` model's)")
    p.add_argument("--domain-json", default=None,
                   help="a dataset entry (JSON) of renditions of the same classes, e.g. ImageNet-R or -Sketch")
    p.add_argument("--domain-images", type=positive_int, default=2000, help="domain images used (a seeded sample)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--device", type=device_arg, default="cpu")
    p.set_defaults(func=cmd_profile)
