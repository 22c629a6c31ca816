"""The reliability promises, kept by every command: kills at any atomic commit leave no temporary
file after a rerun, tampered or malformed stores are refused by every reader, a killed restart
leaves nothing that looks finished, impossible values fail before any work, and unreadable
images either stop the run with one line or are skipped and recorded."""

from __future__ import annotations

import json
import os
import signal
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from visae.cli import main
from visae.errors import VisaeError
from visae.store import ActivationStore
from visae.tools.synth import synth_store

pytestmark = pytest.mark.usefixtures("one_thread")
TEMP_GLOB = ".*.tmp"  # the names of visae's temporary files (visae.atomic.TEMP_GLOB)
# Imported once here, not in every forked run below.
import timm  # noqa: E402,F401
import visae.pretrain.loop, visae.extract, visae.report.collect, visae.report.tables  # noqa: E402,F401,E401

GRID = [{"name": "topk", "architecture": "topk", "k": 3, "expansion": 2, "lr": 3e-3, "lr_warmup": 2,
         "batch_size": 64}]
GRID2 = [{"name": "relu", "architecture": "relu", "l1": 0.01, "expansion": 2, "lr": 3e-3, "lr_warmup": 2,
          "batch_size": 64}]
FMNIST_PRETRAIN = ["pretrain", "--objective", "supervised", "--steps", "2", "--batch-size", "16", "--max-images", "64",
                   "--eval-train", "32", "--eval-test", "32", "--depth", "1", "--embed-dim", "16", "--heads", "2",
                   "--patch-size", "7", "--no-baseline", "--threads", "1", "--quiet"]


# -- helpers ---------------------------------------------------------------------------------
def run_killed(argv: list[str], kill_at: int) -> int:
    """Run `visae argv` in a forked child that SIGKILLs itself just before the `kill_at`-th
    rename of a temporary file onto its final name (the window a real kill can hit). Returns
    the number of such renames the child reached (kill_at if it was killed)."""
    counter = Path(os.environ.get("TMPDIR", "/tmp")) / f"visae-kill-{os.getpid()}"
    counter.write_text("0")
    pid = os.fork()
    if pid == 0:  # child
        try:
            real = os.replace
            seen = [0]

            def replace(src, dst, *a, **kw):
                if Path(src).match(TEMP_GLOB):
                    seen[0] += 1
                    counter.write_text(str(seen[0]))
                    if seen[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                return real(src, dst, *a, **kw)

            os.replace = replace
            torch.set_num_threads(1)
            code = main(argv)
        except BaseException:  # noqa: BLE001
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    reached = int(counter.read_text())
    counter.unlink()
    if kill_at <= reached:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    else:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"{argv} failed with {status}"
    return reached


def temps(root: Path) -> list[Path]:
    return sorted(root.rglob(TEMP_GLOB))


def snapshot(root: Path, exempt=("provenance.json",)) -> dict[str, bytes]:
    """Every file's bytes under root, except those whose content records wall time."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in exempt}


def one_line_error(capsys, argv) -> str:
    """Run argv, expect exit 1 with one `visae: error:` line and no traceback; return it."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("visae: error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synth_store(tmp_path_factory.mktemp("rel") / "store", d=8, atoms=16, k=2, images=40,
                       tokens_per_image=8, shard_images=16)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "saes"
    assert main(["train", "--store", str(store), "--grid-json", json.dumps(GRID), "--out", str(out),
                 "--tokens", "640", "--heldout", "0.2"]) == 0
    return out


# -- 1. temporary files never outlive a kill -------------------------------------------------
def _command(name: str, tmp: Path, store: Path, trained: Path, fashion: Path) -> tuple[list[str], Path]:
    """(argv without the output folder, output folder name) of one command on tiny inputs."""
    if name == "report-tables":
        ev = tmp / "first-eval"
        assert main(["evaluate", "--store", str(store), "--sae", str(trained / "topk"), "--out", str(ev)]) == 0
        return ["report", "tables", "--metrics", str(ev / "metrics.json"), "--out"], "tables"
    model = {"name": "t", "source": "timm", "arch": "vit_tiny_patch16_224", "image_size": 28,
             "model_kwargs": {"patch_size": 7, "depth": 1, "embed_dim": 16, "num_heads": 2}}
    return {
        "train": (["train", "--store", str(store), "--grid-json", json.dumps(GRID), "--tokens", "640",
                   "--checkpoint-every", "320", "--heldout", "0.2", "--out"], "saes"),
        "evaluate": (["evaluate", "--store", str(store), "--sae", str(trained / "topk"), "--out"], "ev"),
        "synth": (["synth", "--d", "8", "--atoms", "16", "--images", "40", "--tokens-per-image", "4",
                   "--out"], "synth"),
        "pretrain": (FMNIST_PRETRAIN + ["--data", str(fashion), "--out"], "pretrain"),
        "extract": (["extract", "--model", json.dumps(model), "--dataset", f"fashion-mnist:{fashion}",
                     "--split", "test", "--layers", "0", "--max-images", "12", "--shard-images", "6",
                     "--batch-size", "6", "--workers", "0", "--device", "cpu", "--no-progress", "--out"], "extract"),
    }[name]


@pytest.mark.parametrize("name", ["train", "evaluate", "extract", "pretrain", "synth", "report-tables"])
def test_kill_at_every_atomic_commit_then_rerun_leaves_no_temp_and_same_bytes(tmp_path, store, trained,
                                                                              fashion_mnist_dir, name):
    """A kill before each of the command's atomic renames, then a plain rerun: no temporary
    file survives and the outputs equal an uninterrupted run's, byte for byte."""
    argv, sub = _command(name, tmp_path, store, trained, fashion_mnist_dir)
    # pretrain's config.json records its training time
    exempt = ("provenance.json", "config.json") if name == "pretrain" else ("provenance.json",)
    clean = tmp_path / "clean" / sub
    commits = run_killed(argv + [str(clean)], kill_at=10 ** 6)  # an uninterrupted run, counted
    assert commits >= 3, commits
    want = snapshot(clean, exempt)
    for kill_at in range(1, commits + 1):
        out = tmp_path / f"kill{kill_at}" / sub
        assert run_killed(argv + [str(out)], kill_at) == kill_at
        assert temps(out), f"the kill at commit {kill_at} left no temporary file to clean"
        run_killed(argv + [str(out)], kill_at=10 ** 6)
        assert temps(out) == [], f"a rerun after a kill at commit {kill_at} left {temps(out)}"
        assert snapshot(out, exempt) == want, f"outputs after a kill at commit {kill_at} differ"


def test_clean_stale_temps_removes_only_temporary_files(tmp_path):
    from visae.atomic import TEMP_GLOB as glob, atomic_path, clean_stale_temps
    assert glob == TEMP_GLOB
    (tmp_path / "a" / ".train").mkdir(parents=True)
    keep = [tmp_path / "a" / "x.json", tmp_path / "a" / ".hidden", tmp_path / "a" / "y.tmp"]
    stale = [tmp_path / "a" / ".train" / ".state.pt.k2j3_x.tmp", tmp_path / "a" / ".acts_00001.npy.tmp",
             tmp_path / ".metrics.json.abc.tmp"]
    for p in keep + stale:
        p.write_text("x")
    assert sorted(clean_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    with atomic_path(tmp_path / "new.json") as tmp:  # the names atomic_path makes are the ones swept
        assert tmp.match(TEMP_GLOB)
        tmp.write_text("{}")
    assert clean_stale_temps(tmp_path / "missing") == []


# -- 2. readers never trust a store ----------------------------------------------------------
def _edit_meta(fn):
    def tamper(root: Path):
        meta = json.loads((root / "meta.json").read_text())
        fn(meta)
        (root / "meta.json").write_text(json.dumps(meta))
    return tamper


def _flip_byte(name):
    def tamper(root: Path):
        data = bytearray((root / name).read_bytes())
        data[-3] ^= 0x40
        (root / name).write_bytes(bytes(data))
    return tamper


def _drop_last_shard(meta):
    meta["shards"].pop()
    meta["n_images"] = meta["shards"][-1]["stop"]
    meta["n_shards"] = len(meta["shards"])


TAMPERS = {
    "flipped acts byte": (_flip_byte("acts_00001.npy"), "acts_00001.npy"),
    "flipped labels byte": (_flip_byte("labels_00002.npy"), "labels_00002.npy"),
    "truncated shard": (lambda r: (r / "acts_00002.npy").write_bytes((r / "acts_00002.npy").read_bytes()[:-64]),
                        "acts_00002.npy"),
    "missing shard": (lambda r: (r / "acts_00000.npy").unlink(), "acts_00000.npy"),
    "edited layer": (_edit_meta(lambda m: m.update(layer=5)), "meta_sha256"),
    "edited model": (_edit_meta(lambda m: m.update(model="other")), "meta_sha256"),
    "edited dataset count": (_edit_meta(lambda m: m["synth"].update(atoms=99)), "meta_sha256"),
    "dropped last shard, counts fixed": (_edit_meta(_drop_last_shard), "meta.json"),
    "dropped last shard, counts and job fixed": (
        _edit_meta(lambda m: (_drop_last_shard(m), m["job"].update(images=m["n_images"]))), "meta_sha256"),
    "invalid JSON": (lambda r: (r / "meta.json").write_text('{"format": "visae-activations/1", '), "valid JSON"),
    "JSON array": (lambda r: (r / "meta.json").write_text("[1, 2]"), "JSON object"),
    "missing key": (_edit_meta(lambda m: m.pop("d_model")), "'d_model'"),
    "wrong type": (_edit_meta(lambda m: m.update(n_images="40")), "'n_images'"),
    "wrong nested type": (_edit_meta(lambda m: m["layout"].update(n_tokens=None)), "'layout.n_tokens'"),
    "shards not a list": (_edit_meta(lambda m: m.update(shards={"0": {}})), "'shards'"),
    "malformed shard entry": (_edit_meta(lambda m: m["shards"][1].update(start=3)), "shards[1]"),
}


@pytest.mark.parametrize("what", list(TAMPERS))
def test_tampered_store_is_refused_by_verify_train_and_evaluate(tmp_path, store, trained, capsys, what):
    tamper, named = TAMPERS[what]
    bad = tmp_path / "store"
    shutil.copytree(store, bad)
    tamper(bad)
    assert main(["verify", str(bad)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith(str(bad)) for line in lines) and named in lines[0], lines
    msg = one_line_error(capsys, ["train", "--store", str(bad), "--grid-json", json.dumps(GRID),
                                  "--out", str(tmp_path / "saes"), "--tokens", "64"])
    assert named in msg and not (tmp_path / "saes" / "provenance.json").exists()
    msg = one_line_error(capsys, ["evaluate", "--store", str(bad), "--sae", str(trained / "topk"),
                                  "--out", str(tmp_path / "ev")])
    assert named in msg and not (tmp_path / "ev" / "metrics.json").exists()


def test_store_hash_comes_from_the_data(store, trained):
    opened = ActivationStore(store, verify=True)
    assert opened.store_hash == ActivationStore(store).store_hash
    cfg = json.loads((trained / "topk" / "config.json").read_text())
    assert cfg["source"]["store_hash"] == opened.store_hash
    assert opened._file_hashes and set(opened._file_hashes) == {
        n for s in opened.info.shards for n in s["files"]}


# -- 3. a killed restart leaves nothing that looks finished -----------------------------------
def test_killed_restart_stale_leaves_no_finished_looking_outputs(tmp_path, store, capsys):
    out = tmp_path / "saes"
    base = ["train", "--store", str(store), "--tokens", "640", "--heldout", "0.2", "--out", str(out)]
    assert main(base + ["--grid-json", json.dumps(GRID)]) == 0
    assert (out / "provenance.json").is_file() and (out / "topk" / "config.json").is_file()
    # the same SAE name with other settings: the run restarts, and is killed at its first commit
    changed = [{**GRID[0], "lr": 1e-3}] 
    assert run_killed(base + ["--grid-json", json.dumps(changed), "--restart-stale"], kill_at=1) == 1
    assert not (out / "provenance.json").exists()
    assert not (out / "topk" / "config.json").exists() and not (out / "topk" / "checkpoint" / "config.json").exists()
    msg = one_line_error(capsys, ["evaluate", "--store", str(store), "--sae", str(out / "topk"),
                                  "--out", str(tmp_path / "ev")])
    assert "topk" in msg and not (tmp_path / "ev").exists()
    # killed later, with a checkpoint written: still nothing that looks done
    assert run_killed(base + ["--grid-json", json.dumps(changed + GRID2), "--restart-stale",
                              "--checkpoint-every", "128"], kill_at=4) == 4
    assert not (out / "provenance.json").exists() and not (out / "topk" / "config.json").exists()
    assert "relu" in one_line_error(capsys, ["evaluate", "--store", str(store), "--sae",
                                             str(out / "relu"), "--out", str(tmp_path / "ev")])
    assert main(base + ["--grid-json", json.dumps(changed + GRID2), "--restart-stale",
                        "--checkpoint-every", "128"]) == 0
    assert main(["evaluate", "--store", str(store), "--sae", str(out / "relu"), "--out", str(tmp_path / "ev")]) == 0


def test_evaluate_refuses_an_sae_of_an_unfinished_run(tmp_path, store, trained, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / "provenance.json").unlink()
    assert "did not finish" in one_line_error(capsys, ["evaluate", "--store", str(store), "--sae",
                                                       str(run / "topk"), "--out", str(tmp_path / "ev")])
    cfg = json.loads((trained / "topk" / "config.json").read_text())
    shutil.copytree(trained / "topk", tmp_path / "lone")
    (tmp_path / "lone" / "config.json").write_text(json.dumps({**cfg, "complete": False}))
    assert "not a finished checkpoint" in one_line_error(
        capsys, ["evaluate", "--store", str(store), "--sae", str(tmp_path / "lone"), "--out", str(tmp_path / "ev")])


# -- 4. values that cannot be right fail before any work --------------------------------------
def _flag_table():
    """(command argv without the flag, flag, bad value) for every numeric flag of every command."""
    rows = []
    train = ["train", "--store", "{store}", "--grid-json", json.dumps(GRID), "--out", "{out}"]
    for flag, values in {"--tokens": ["0", "-5", "1.5", "x"], "--checkpoint-every": ["-1", "0"],
                         "--heldout": ["0", "1", "-0.1", "nan"], "--seed": ["-1"], "--device": ["gpu", "cuda:99"]}.items():
        rows += [(train, flag, v) for v in values]
    ev = ["evaluate", "--store", "{store}", "--sae", "{sae}", "--out", "{out}"]
    for flag, values in {"--batch-size": ["0", "-1"], "--heldout": ["0", "2"], "--device": ["tpu"]}.items():
        rows += [(ev, flag, v) for v in values]
    ex = ["extract", "--model", "timm:vit_tiny_patch16_224", "--dataset", "fashion-mnist", "--layers", "0",
          "--out", "{out}"]
    for flag, values in {"--batch-size": ["0"], "--max-images": ["0", "-3"], "--shard-images": ["-1"],
                         "--workers": ["-1", "two"], "--device": ["cuda:7", "bogus"], "--image-size": ["0"]}.items():
        rows += [(ex, flag, v) for v in values]
    sy = ["synth", "--out", "{out}"]
    for flag, values in {"--noise": ["-1", "inf", "nan"], "--d": ["0"], "--atoms": ["-2"], "--k": ["0"],
                         "--images": ["0"], "--tokens-per-image": ["0"], "--seed": ["-1"]}.items():
        rows += [(sy, flag, v) for v in values]
    pre = ["pretrain", "--objective", "supervised", "--out", "{out}"]
    for flag in ("--image-size", "--patch-size", "--depth", "--embed-dim", "--heads", "--steps", "--epochs",
                 "--batch-size", "--max-images", "--eval-train", "--eval-test", "--threads"):
        rows += [(pre, flag, "0"), (pre, flag, "-1")]
    for flag in ("--mlp-ratio", "--lr", "--temperature"):
        rows += [(pre, flag, "0"), (pre, flag, "nan")]
    rows += [(pre, "--weight-decay", "-0.1"), (pre, "--seed", "-1"), (pre, "--device", "cuda:9")]
    return rows


@pytest.mark.parametrize("argv, flag, value", _flag_table(), ids=lambda x: x if isinstance(x, str) else None)
def test_every_numeric_flag_is_range_checked_before_work(tmp_path, store, trained, capsys, argv, flag, value):
    out = tmp_path / "out"
    names = {"{store}": str(store), "{sae}": str(trained / "topk"), "{out}": str(out)}
    argv = [names.get(a, a) for a in argv]
    msg = one_line_error(capsys, argv + [flag, value])
    assert f"{flag} must be" in msg or f"{flag} {value!r}" in msg or f"{value!r}" in msg, msg
    assert flag in msg and value in msg
    assert not out.exists()


def test_library_calls_check_ranges_too(tmp_path, store):
    from visae.sae.train import train_grid
    for kw in ({"tokens": 0}, {"tokens": -64}, {"checkpoint_every": -1}):
        with pytest.raises(VisaeError, match="must be an integer >= 1"):
            train_grid(store, GRID, tmp_path / "saes", **kw)
    assert not (tmp_path / "saes" / "provenance.json").exists()
    with pytest.raises(VisaeError, match="--noise"):
        synth_store(tmp_path / "s", noise=-1.0)
    assert not (tmp_path / "s").exists()


# -- 5. the config fails at plan time, naming the key ------------------------------------------
@pytest.fixture(scope="module")
def plan_project(tmp_path_factory):
    from tests.test_workflow import copy_project, tiny_config
    return copy_project(tmp_path_factory.mktemp("plan"), tiny_config())


def _plan(project: Path, config: dict):
    from tests.test_workflow import run
    path = project / "config" / "case.yaml"
    path.write_text(yaml.safe_dump(config))
    return run(project, "snakemake", "-n", "--configfile", str(path), check=False)


def _tiny():
    from tests.test_workflow import tiny_config
    return tiny_config()


def _k_too_big(c):  # tiny config: embed_dim 32, expansion 8 -> width 256
    c["saes"]["topk-16"]["k"] = 300


def _k_aux_too_big(c):
    c["saes"]["topk-16"]["k_aux"] = 257


def _width_too_small(c):
    c["saes"]["topk-16"].update(width=8, k=16)
    c["saes"]["topk-16"].pop("expansion")


def _prefix_not_fraction(c):  # prefixes are fractions of the width (the schema says so)
    c["saes"]["m"] = {"architecture": "matryoshka", "expansion": 1, "k": 4, "prefixes": [16, 64]}


def _known_arch_too_narrow(c):  # vit_small: d_model 384, expansion 1 -> width 384
    c["models"]["vit-open"] = {"source": "timm", "arch": "vit_small_patch16_224", "layers": [1]}
    c["saes"]["wide-k"] = {"architecture": "topk", "expansion": 1, "k": 400}


def _open_clip_too_narrow(c):
    c["models"]["clip"] = {"source": "open_clip", "arch": "ViT-B-16", "layers": [1]}
    c["saes"]["wide-k"] = {"architecture": "batchtopk", "expansion": 1, "k": 769}


def _pretrain_root_missing(c):
    c["datasets"]["fmnist-train"]["root"] = "/nonexistent/fashion"


@pytest.mark.parametrize("change, key", [
    (_k_too_big, "saes.topk-16.k"), (_k_aux_too_big, "saes.topk-16.k_aux"), (_width_too_small, "saes.topk-16.k"),
    (_prefix_not_fraction, "['saes']['m']['prefixes']"), (_known_arch_too_narrow, "saes.wide-k.k"),
    (_open_clip_too_narrow, "saes.wide-k.k"), (_pretrain_root_missing, "datasets.fmnist-train.root"),
])
def test_plan_time_checks_name_the_key(plan_project, change, key):
    config = _tiny()
    change(config)
    proc = _plan(plan_project, config)
    assert proc.returncode != 0 and key in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert "Job stats" not in proc.stdout


def test_plan_accepts_k_at_the_width(plan_project):
    config = _tiny()
    config["saes"]["topk-16"]["k"] = 256
    proc = _plan(plan_project, config)
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- 6. an unreadable image in the middle of a dataset ----------------------------------------
@pytest.fixture
def broken_folder(tmp_path, cifar10_dir):
    root = tmp_path / "images"
    for cls in ("airplane", "cat"):
        (root / cls).mkdir(parents=True)
        for src in sorted((cifar10_dir / cls).iterdir())[:4]:
            shutil.copy(src, root / cls / src.name)
    victim = sorted((root / "airplane").iterdir())[2]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 3])  # a truncated JPEG
    return root, victim


def _extract_argv(root: Path, out: Path) -> list[str]:
    model = {"name": "t", "source": "timm", "arch": "vit_tiny_patch16_224", "image_size": 32,
             "model_kwargs": {"patch_size": 8, "depth": 1, "embed_dim": 16, "num_heads": 2}}
    return ["extract", "--model", json.dumps(model), "--dataset", f"imagefolder:{root}", "--layers", "0",
            "--shard-images", "3", "--batch-size", "2", "--workers", "0", "--device", "cpu", "--no-progress",
            "--out", str(out)]


def test_corrupt_image_stops_by_default_with_one_line(tmp_path, broken_folder, capsys):
    root, victim = broken_folder
    for _ in range(2):  # a rerun stops at the same image, the same way
        msg = one_line_error(capsys, _extract_argv(root, tmp_path / "out"))
        assert victim.name in msg
        assert not (tmp_path / "out" / "extract.json").exists()


def test_skip_bad_images_records_them_and_reruns_the_same(tmp_path, broken_folder, capsys):
    root, victim = broken_folder
    out = tmp_path / "out"
    assert main(_extract_argv(root, out) + ["--skip-bad-images"]) == 0
    assert victim.name in capsys.readouterr().err
    meta = json.loads((out / "layer_0" / "meta.json").read_text())
    skipped = meta["dataset"]["skipped_images"]
    assert [s["index"] for s in skipped] == [2] and victim.name in skipped[0]["error"]
    assert meta["n_images"] == 7 and meta["dataset"]["n_images_total"] == 8
    store = ActivationStore(out / "layer_0", verify=True)
    assert store.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    before = snapshot(out)
    (out / "extract.json").unlink()
    (out / "layer_0" / "acts_00002.npy").unlink()  # a rerun resumes the same store, same bytes
    assert main(_extract_argv(root, out) + ["--skip-bad-images"]) == 0
    assert snapshot(out) == before
