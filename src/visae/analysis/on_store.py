"""An SAE on a store: the one way an analysis opens both, checks that they fit, and reads tokens.

`open_sae_on_store` opens the store verified (every shard re-hashed: never analyse a tampered
store), loads the SAE, refuses an unfinished training run, an SAE of another width (d_model), and
one trained on another model or layer than the store's (unless `allow_mismatch`, and then says
so), and resolves the held-out images (the SAE's split seed, with its held-out fraction unless
told one; never more than it held out on the store it was trained on) and the token kind the SAE
was trained on. Its `loader` reads those tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visae.errors import VisaeError
from visae.layout import RUN_MARKER
from visae.sae import checkpoint as ckpt
from visae.sae.split import SPLIT_METHOD, split_images
from visae.store import ActivationStore, TokenLoader

FROM_SAE = "__from_sae__"  # token_kind default: the kind the SAE was trained on


@dataclass
class SaeOnStore:
    store: ActivationStore
    sae: torch.nn.Module
    heldout: float  # the held-out fraction used
    split_seed: int
    held: np.ndarray  # the held-out image indices, sorted
    token_kind: str | None
    mismatch: str | None  # why the SAE's source differs from the store (with allow_mismatch), else None
    device: str = "cpu"

    @property
    def config(self) -> dict:
        return self.sae.config

    def loader(self, batch_size: int, **options) -> TokenLoader:
        """The held-out tokens of the SAE's kind: by default each once, in store order, as float32
        on the SAE's device (`options` go to TokenLoader)."""
        kw = dict(images=self.held, shuffle=False, drop_last=False, epochs=1, token_kind=self.token_kind,
                  dtype=torch.float32, device=self.device, prefetch=False)
        return TokenLoader(self.store, batch_size, **(kw | options))


def open_sae_on_store(store_path, sae_path, *, heldout: float | None = None, token_kind: str | None = FROM_SAE,
                      allow_mismatch: bool = False, device: str = "cpu") -> SaeOnStore:
    """The SAE at `sae_path` on the store at `store_path`, checked; every refusal is a VisaeError."""
    store = ActivationStore(store_path, verify=True)  # re-hash: never train/evaluate on a tampered store
    sae = ckpt.load(sae_path, device=device)
    cfg = sae.config
    check_finished(Path(sae_path), cfg)
    ckpt.check_compatible(sae, store)
    mismatch = ckpt.source_mismatch(sae, store, allow=allow_mismatch)
    trained_heldout = cfg.get("split", {}).get("heldout")
    if heldout is None:
        heldout = trained_heldout if trained_heldout is not None else 0.1
    if trained_heldout is not None and cfg.get("source", {}).get("store_hash") == store.store_hash \
            and heldout > trained_heldout + 1e-12:
        raise VisaeError(f"--heldout {heldout} would evaluate on images SAE {cfg.get('name')!r} was trained on "
                         f"(it held out only {trained_heldout}): use --heldout <= {trained_heldout}")
    if token_kind == FROM_SAE:
        token_kind = cfg.get("source", {}).get("token_kind")
    split = cfg.get("split", {})
    if split.get("method") != SPLIT_METHOD or not isinstance(split.get("seed"), int):
        # an SAE from before the seeded split held out the last images in store order: its own
        # split cannot be rebuilt, and seed 0's held-out images would be mostly its training images
        raise VisaeError(f"SAE {cfg.get('name')!r} does not record a seeded held-out split (trained by an older "
                         f"visae, which held out the last images): retrain it")
    split_seed = split["seed"]
    _, held = split_images(store.n_images, heldout, split_seed)
    if not len(held):
        raise VisaeError("nothing is held out: use --heldout > 0")
    return SaeOnStore(store, sae, heldout, split_seed, held, token_kind, mismatch, device)


def check_finished(sae_path: Path, cfg: dict) -> None:
    """Refuse an SAE whose training run did not finish: its config must say complete, and a
    `visae train` folder around it must hold the run's provenance.json (written last)."""
    directory = sae_path.parent if sae_path.is_file() else sae_path
    run = directory.parent
    if cfg.get("complete") is not True:
        raise VisaeError(f"SAE {directory} is not a finished checkpoint (its config.json is not complete)")
    if (run / ".train").is_dir() and not (run / RUN_MARKER).is_file():
        raise VisaeError(f"the training run in {run} did not finish (no provenance.json): rerun `visae train`")
