"""The workflow on a real SLURM cluster: munged, slurmctld and slurmd started here, on localhost.

Debian's slurm-wlm and munge (installed by .ci/run) as root, every file of the cluster in a temp
dir, its config linked at /run/slurm/conf while it runs (see NODE_CONF_LINK). Jobs go through `snakemake --executor slurm` (the pinned executor plugin) with
profiles/slurm-local: no Apptainer, so jobs run in this environment. The test compares the
outputs with a local run of the same target and reads the scheduler's own job records.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from test_workflow import DATASET, LAYER, copy_project, planned_jobs, run, tiny_config
from visae.layout import Layout

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "srun")
# Where a configless compute node keeps its config and where srun looks when neither SLURM_CONF
# nor /etc/slurm/slurm.conf names one. The slurm-jobstep plugin drops SLURM_CONF from the job
# step's environment (all SLURM_* variables), so the `srun` inside each job finds ours here.
NODE_CONF_LINK = Path("/run/slurm/conf")
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
TARGET = "extract_all"  # fetch, pretrain and extract jobs: the stages that write the stores

pytestmark = pytest.mark.usefixtures("fashion_mnist_dir")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(d: Path, host: str) -> str:
    """One node (this machine's real CPUs and memory, as `slurmd -C` reports them), one partition;
    no cgroups (linuxproc tracking, no task plugin), no accounting database: squeue keeps
    finished jobs for MinJobAge, which the profile's squeue status checks need."""
    hardware = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    node = " ".join(w for w in hardware.splitlines()[0].split() if not w.startswith("NodeName="))
    return f"""\
ClusterName=visaetest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 {node} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(lines[-3:]) or f"no {path.name}"


def node_state(env: dict) -> str:
    proc = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=30)
    return proc.stdout.strip()


@pytest.fixture
def cluster(monkeypatch):
    """SLURM_CONF of a one-node cluster on localhost, torn down (by pid) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("starting munged, slurmctld and slurmd needs root")
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if SYSTEM_CONF.exists() or NODE_CONF_LINK.exists() or NODE_CONF_LINK.is_symlink():
        pytest.skip(f"this machine has a SLURM config of its own ({SYSTEM_CONF} or {NODE_CONF_LINK}); "
                    "the jobs' srun would use it")
    d = Path(tempfile.mkdtemp(prefix="visae-slurm-"))
    d.chmod(0o755)  # munged wants the socket's directories searchable by all
    for sub in ("munge", "state", "spool", "etc"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = d / "etc" / "slurm.conf"
    conf.write_text(slurm_conf(d, host))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []
    made_run_dir = not NODE_CONF_LINK.parent.exists()

    def start(name: str, *args: str) -> None:
        with open(d / f"{name}.out", "wb") as out:
            procs.append(subprocess.Popen([name, *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))

    def fail(what: str, log: Path) -> None:
        pytest.skip(f"{what} did not start: {log_tail(log)}")

    try:
        subprocess.run(["mungekey", "--create", f"--keyfile={d}/munge/munge.key"], check=True,
                       capture_output=True)
        start("munged", "--foreground", f"--socket={d}/munge/munge.socket", f"--key-file={d}/munge/munge.key",
              f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/munge/munged.log",
              f"--seed-file={d}/munge/munged.seed")
        deadline = time.monotonic() + 20
        while not (d / "munge" / "munge.socket").exists():
            if procs[-1].poll() is not None or time.monotonic() > deadline:
                fail("munged", d / "munged.out")
            time.sleep(0.1)
        NODE_CONF_LINK.parent.mkdir(parents=True, exist_ok=True)
        NODE_CONF_LINK.symlink_to(conf.parent)
        start("slurmctld", "-D", "-f", str(conf))
        start("slurmd", "-D", "-f", str(conf), "-N", host)
        deadline = time.monotonic() + 60
        while (state := node_state(env)) != "idle":
            for proc, name in zip(procs[1:], ("slurmctld", "slurmd")):
                if proc.poll() is not None:
                    fail(name, d / f"{name}.log")
            if time.monotonic() > deadline:
                fail(f"the node (state {state!r})", d / "slurmd.log")
            time.sleep(0.5)
        monkeypatch.setenv("SLURM_CONF", str(conf))
        yield d
    finally:
        if len(procs) == 3 and procs[1].poll() is None:  # jobs a failed run left behind
            subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=30)
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if NODE_CONF_LINK.is_symlink() and NODE_CONF_LINK.readlink() == conf.parent:
            NODE_CONF_LINK.unlink()
            if made_run_dir:
                NODE_CONF_LINK.parent.rmdir()
        shutil.rmtree(d, ignore_errors=True)


def outputs(root: Path) -> dict:
    """Every output of the target, by content: pretrained weights, and the stores' shards."""
    results, config = Layout(root / "results"), tiny_config()
    digests = {}
    for model in config["models"]:
        weights = Path(results.pretrain_model(model)).read_bytes()
        digests[model] = hashlib.sha256(weights).hexdigest()
        meta = json.loads((Path(results.store(model, DATASET, LAYER)) / "meta.json").read_text())
        assert meta["complete"], model
        digests[f"{model}/store"] = meta["shards"]
    return digests


def fresh_copy(path: Path) -> Path:
    path.mkdir()
    return copy_project(path, tiny_config())


def scheduler_records() -> list[dict]:
    """Every job slurmctld knows (finished ones are kept MinJobAge s): id, name, comment, state, node."""
    proc = subprocess.run(["squeue", "--states=all", "--noheader", "--format=%i|%j|%k|%T|%N"],
                          capture_output=True, text=True, check=True, timeout=30)
    keys = ("id", "name", "comment", "state", "node")
    return [dict(zip(keys, line.split("|"))) for line in proc.stdout.splitlines() if line.strip()]


@pytest.mark.slow
def test_workflow_on_a_slurm_cluster_matches_a_local_run(cluster, project, tmp_path):
    """The same config on SLURM writes the same bytes as the local run of the whole DAG (`project`)."""
    on_slurm = fresh_copy(tmp_path / "slurm")
    # the jobs to submit, named as the executor plugin comments them: rule_<rule>_wildcards_<values>
    expected = Counter(
        f"rule_{rule}" + (f"_wildcards_{'_'.join(wc.values())}" if wc else "")
        for rule, wc in planned_jobs(run(on_slurm, "snakemake", "-n", TARGET)) if rule != TARGET
    )
    assert sum(expected.values()) == 1 + 2 * len(tiny_config()["models"])  # fetch, pretrain, extract

    t0 = time.monotonic()
    proc = run(on_slurm, "snakemake", "--executor", "slurm", "--profile", "profiles/slurm-local", "-j", "4",
               TARGET)
    print(f"slurm run: {time.monotonic() - t0:.0f} s")
    log = proc.stdout + proc.stderr
    submitted = re.findall(r"has been submitted with SLURM jobid (\d+)", log)

    records = [r for r in scheduler_records() if r["id"] in submitted]
    assert len(records) == len(submitted) == sum(expected.values()), log[-3000:]
    assert Counter(r["comment"] for r in records) == expected
    host = socket.gethostname().split(".")[0]
    assert {(r["state"], r["node"]) for r in records} == {("COMPLETED", host)}
    assert len({r["name"] for r in records}) == 1  # one workflow run: its id is every job's name

    assert outputs(on_slurm) == outputs(project)
