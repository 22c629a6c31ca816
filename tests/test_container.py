"""`visae container`: the exact container spec against a mocked Docker API, then a real engine.

The unit tests use a real `docker.DockerClient` whose low-level API is mocked, so they check
what docker-py would send to the daemon. The integration tests start `dockerd` (as root), build
a Debian base image locally with debootstrap (no registry is reachable), build the project's own
Dockerfile on it with the light dependency set, and run snakemake in it on a repo copy.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import docker
import pytest
import yaml
from docker.errors import APIError, ImageNotFound
from docker.types import DeviceRequest

from visae import cli
from visae.tools import container as vc
from visae.errors import VisaeError

REPO_ROOT = Path(__file__).resolve().parents[1]
API_VERSION = "1.41"  # Docker 20.10 (Debian bookworm's docker.io): the oldest engine we meet


# --------------------------------------------------------------------------- helpers


def visae(argv: list[str]) -> int:
    """`visae ...` through the real CLI entry point (which imports only the container module)."""
    return cli.main(argv)


def mocked_client(**api_overrides) -> tuple[docker.DockerClient, mock.MagicMock]:
    """A real DockerClient (models, argument translation) over a mocked low-level API."""
    client = docker.DockerClient(base_url="unix:///nonexistent/docker.sock", version=API_VERSION)
    api = mock.create_autospec(docker.APIClient, instance=True)
    api._version = API_VERSION
    api.create_container.return_value = {"Id": "c0ffee"}
    api.inspect_container.return_value = {"Id": "c0ffee", "Name": "/visae-test", "State": {}}
    api.attach.return_value = iter([(b"hello from stdout\n", None), (None, b"job table on stderr\n")])
    api.wait.return_value = {"StatusCode": 0}
    for name, value in api_overrides.items():
        setattr(api, name, value)
    client.api = api
    return client, api


def spec(**overrides):
    kwargs = dict(
        image="visae:latest",
        args=["-n"],
        repo=Path("/home/me/visae"),
        cache=Path("/home/me/.cache/visae"),
        uid=1234,
        gid=5678,
        environ={},
    )
    kwargs.update(overrides)
    return vc.run_spec(**kwargs)


# --------------------------------------------------------------------------- the pure spec


def test_run_spec_is_exact():
    s = spec(
        environ={"HF_HUB_OFFLINE": "1", "HOME": "/home/me", "PATH": "/usr/bin"},
        network="host",
        username="me",
    )
    assert s == {
        "image": "visae:latest",
        "command": ["-n"],
        "working_dir": "/workspace",
        "user": "1234:5678",
        "volumes": {
            "/home/me/visae": {"bind": "/workspace", "mode": "rw"},
            "/home/me/.cache/visae": {"bind": "/cache", "mode": "rw"},
        },
        "device_requests": [DeviceRequest(count=-1, capabilities=[["gpu"]])],
        "shm_size": "8g",
        "environment": {"HF_HUB_OFFLINE": "1", "USER": "me", "TINI_KILL_PROCESS_GROUP": "1"},
        "init": True,
        "stdin_open": False,
        "tty": False,
        "auto_remove": False,
        "labels": {"org.visae.repo": "/home/me/visae"},
        "network_mode": "host",
    }


def test_no_args_leaves_the_images_cmd():
    assert spec(args=[])["command"] is None


@pytest.mark.parametrize(
    "gpus, expected",
    [
        ("all", [DeviceRequest(count=-1, capabilities=[["gpu"]])]),
        ("2", [DeviceRequest(count=2, capabilities=[["gpu"]])]),
        (1, [DeviceRequest(count=1, capabilities=[["gpu"]])]),
        ("0", []),
        (None, []),
        ("device=0,3", [DeviceRequest(device_ids=["0", "3"], capabilities=[["gpu"]])]),
    ],
)
def test_gpu_device_requests(gpus, expected):
    assert spec(gpus=gpus)["device_requests"] == expected


@pytest.mark.parametrize("bad", ["two", "-1", "device="])
def test_bad_gpus_is_one_line(bad):
    with pytest.raises(VisaeError, match="--gpus"):
        vc.device_requests(bad)


def test_env_passthrough_only_what_is_set_and_listed():
    environ = {
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "hf_x",
        "WANDB_API_KEY": "w",
        "WANDB_MODE": "offline",
        "CUDA_VISIBLE_DEVICES": "1,2",
        "AWS_SECRET_ACCESS_KEY": "no",
        "HOME": "/root",
        "PATH": "/bin",
        "LD_LIBRARY_PATH": "/x",
    }
    env = spec(environ=environ, extra_env={"EXTRA": "y"})["environment"]
    assert env == {
        "CUDA_VISIBLE_DEVICES": "1,2",
        "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": "hf_x",
        "WANDB_API_KEY": "w",
        "WANDB_MODE": "offline",
        "USER": "visae",
        "TINI_KILL_PROCESS_GROUP": "1",
        "EXTRA": "y",
    }


# --------------------------------------------------------------------------- what docker-py sends


def test_create_sends_the_spec_to_the_daemon():
    client, api = mocked_client()
    out, err = io.StringIO(), io.StringIO()
    rc = vc.run_container(client, spec(network="none", shm_size="2g"), stdout=out, stderr=err)
    assert rc == 0
    kwargs = api.create_container.call_args.kwargs
    assert kwargs["image"] == "visae:latest"
    assert kwargs["command"] == ["-n"]
    assert kwargs["user"] == "1234:5678"
    assert kwargs["working_dir"] == "/workspace"
    assert kwargs["environment"] == {"USER": "visae", "TINI_KILL_PROCESS_GROUP": "1"}
    host = kwargs["host_config"]
    assert sorted(host["Binds"]) == [
        "/home/me/.cache/visae:/cache:rw",
        "/home/me/visae:/workspace:rw",
    ]
    assert host["DeviceRequests"] == [
        {"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert host["ShmSize"] == 2 * 1024**3
    assert host["NetworkMode"] == "none"
    assert host["Init"] is True
    assert not host.get("AutoRemove")
    # Attached before start, so no output is lost; removed after the exit code was read.
    names = [c[0] for c in api.method_calls]
    assert names.index("attach") < names.index("start") < names.index("wait")
    assert names.index("wait") < names.index("remove_container")
    api.remove_container.assert_called_once_with("c0ffee", force=True)
    assert out.getvalue() == "hello from stdout\n"
    assert err.getvalue() == "job table on stderr\n"


def test_no_gpus_sends_no_device_request():
    client, api = mocked_client()
    vc.run_container(client, spec(gpus="0"), stdout=io.StringIO(), stderr=io.StringIO())
    assert not api.create_container.call_args.kwargs["host_config"].get("DeviceRequests")


def test_exit_code_is_the_containers():
    client, api = mocked_client()
    api.wait.return_value = {"StatusCode": 3}
    assert vc.run_container(client, spec(), stdout=io.StringIO(), stderr=io.StringIO()) == 3
    api.remove_container.assert_called_once_with("c0ffee", force=True)


def test_keyboard_interrupt_stops_and_removes():
    def output():
        yield (b"working\n", None)
        raise KeyboardInterrupt

    client, api = mocked_client()
    api.attach.return_value = output()
    with pytest.raises(KeyboardInterrupt):
        vc.run_container(client, spec(), stdout=io.StringIO(), stderr=io.StringIO())
    api.kill.assert_called_once_with("c0ffee", signal="SIGINT")
    api.wait.assert_called_once_with("c0ffee", timeout=vc.STOP_GRACE_S)
    api.remove_container.assert_called_once_with("c0ffee", force=True)


def test_keyboard_interrupt_through_the_cli_exits_130(tmp_path, capsys):
    def output():
        raise KeyboardInterrupt
        yield  # pragma: no cover

    client, api = mocked_client()
    api.attach.return_value = output()
    with mock.patch.object(vc, "connect", return_value=client):
        rc = visae(["container", "run", "--repo", str(tmp_path), "--cache", str(tmp_path / "c")])
    assert rc == 130
    api.remove_container.assert_called_once_with("c0ffee", force=True)


def test_cli_run_uses_callers_uid_gid_repo_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    client, api = mocked_client()
    api.wait.return_value = {"StatusCode": 7}
    repo, cache = tmp_path / "repo", tmp_path / "cache"
    repo.mkdir()
    (repo / "Snakefile").write_text("")
    monkeypatch.chdir(repo)
    with mock.patch.object(vc, "connect", return_value=client):
        rc = visae(["container", "run", "--gpus", "2", "--cache", str(cache), "-e", "A=1", "--",
                    "--cores", "4", "all"])
    assert rc == 7
    assert cache.is_dir()  # made by the caller, so it is theirs
    kwargs = api.create_container.call_args.kwargs
    assert kwargs["user"] == f"{os.getuid()}:{os.getgid()}"
    assert kwargs["command"] == ["--cores", "4", "all"]
    assert kwargs["environment"]["WANDB_MODE"] == "offline"
    assert kwargs["environment"]["A"] == "1"
    assert "HF_TOKEN" not in kwargs["environment"]
    host = kwargs["host_config"]
    assert f"{repo.resolve()}:/workspace:rw" in host["Binds"]
    assert f"{cache.resolve()}:/cache:rw" in host["Binds"]
    assert host["DeviceRequests"][0]["Count"] == 2


# --------------------------------------------------------------------------- one-line errors


def test_no_daemon_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(VisaeError, match=r"^no Docker daemon at unix:///nonexistent/docker.sock"):
        vc.connect()
    rc = visae(["container", "run", "--repo", str(tmp_path), "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith("visae: error: no Docker daemon") and err.count("\n") == 1


def test_missing_image_is_one_line():
    client, api = mocked_client()
    api.create_container.side_effect = ImageNotFound("No such image: visae:latest")
    with pytest.raises(VisaeError) as e:
        vc.run_container(client, spec(), stdout=io.StringIO(), stderr=io.StringIO())
    assert str(e.value) == "image visae:latest not found: run `visae container build`"
    api.start.assert_not_called()


def test_no_nvidia_runtime_is_one_line_and_removes():
    client, api = mocked_client()
    response = mock.Mock(status_code=500, reason="Internal Server Error", url="http://x/start")
    api.start.side_effect = APIError(
        "500 Server Error", response=response,
        explanation='could not select device driver "" with capabilities: [[gpu]]',
    )
    with pytest.raises(VisaeError) as e:
        vc.run_container(client, spec(), stdout=io.StringIO(), stderr=io.StringIO())
    msg = str(e.value)
    assert msg.startswith("no NVIDIA container runtime for the GPU request")
    assert "--gpus 0" in msg and "\n" not in msg
    api.remove_container.assert_called_once_with("c0ffee", force=True)


# --------------------------------------------------------------------------- build


def test_build_streams_log_and_passes_args(tmp_path):
    (tmp_path / "containers").mkdir()
    (tmp_path / "containers" / "Dockerfile").write_text("FROM scratch\n")
    client, api = mocked_client()
    api.build.return_value = iter([
        {"stream": "Step 1/1 : FROM scratch\n"},
        {"aux": {"ID": "sha256:abc"}},
        {"stream": "Successfully built abc\n"},
    ])
    out = io.StringIO()
    image_id = vc.build_image(client, context=tmp_path, tag="visae:t",
                              buildargs={"VISAE_DEPS": "light"}, network_mode="host", out=out)
    assert image_id == "sha256:abc"
    assert out.getvalue() == "Step 1/1 : FROM scratch\nSuccessfully built abc\n"
    kw = api.build.call_args.kwargs
    assert kw["path"] == str(tmp_path)
    assert kw["dockerfile"] == "containers/Dockerfile"
    assert kw["tag"] == "visae:t"
    assert kw["buildargs"] == {"VISAE_DEPS": "light"}
    assert kw["network_mode"] == "host"
    assert kw["decode"] is True


def test_build_error_is_one_line(tmp_path):
    (tmp_path / "containers").mkdir()
    (tmp_path / "containers" / "Dockerfile").write_text("FROM scratch\n")
    client, api = mocked_client()
    api.build.return_value = iter([
        {"stream": "Step 1/3 : RUN false\n"},
        {"error": "The command '/bin/sh -c false' returned a non-zero code: 1\nmore",
         "errorDetail": {"message": "The command '/bin/sh -c false' returned a non-zero code: 1"}},
    ])
    with pytest.raises(VisaeError, match=r"^docker build failed: The command .* code: 1$"):
        vc.build_image(client, context=tmp_path, out=io.StringIO())


def test_cli_build_maps_options_to_build_args(tmp_path):
    (tmp_path / "containers").mkdir()
    (tmp_path / "containers" / "Dockerfile").write_text("FROM scratch\n")
    client, api = mocked_client()
    api.build.return_value = iter([{"aux": {"ID": "sha256:abc"}}])
    with mock.patch.object(vc, "connect", return_value=client):
        rc = visae(["container", "build", "--repo", str(tmp_path), "--base-image", "b:1",
                    "--deps", "light", "--build-arg", "PIP_INDEX_URL=http://i", "--network", "host"])
    assert rc == 0
    kw = api.build.call_args.kwargs
    assert kw["buildargs"] == {"PIP_INDEX_URL": "http://i", "BASE_IMAGE": "b:1", "VISAE_DEPS": "light"}
    assert kw["network_mode"] == "host" and kw["tag"] == "visae:latest"


# --------------------------------------------------------------------------- the files


def test_dockerfile_is_classic_builder_and_has_the_contract():
    text = (REPO_ROOT / "containers" / "Dockerfile").read_text()
    assert "# syntax=" not in text and "--mount=" not in text and "<<" not in text  # no BuildKit
    assert "ARG BASE_IMAGE=nvidia/cuda:" in text and "FROM ${BASE_IMAGE}" in text
    assert "ARG VISAE_DEPS=full" in text and "-c constraints.txt" in text
    for env in ("DVC_NO_ANALYTICS=1", "MPLBACKEND=Agg", "HF_HOME=/cache/", "TORCH_HOME=/cache/",
                "XDG_CACHE_HOME=/cache"):
        assert env in text
    assert "git config --system --add safe.directory /workspace" in text
    assert "\nUSER visae\n" in text and 'ENTRYPOINT ["snakemake"]' in text
    assert "WORKDIR /workspace" in text


def test_dockerfile_leaves_index_and_mirror_to_the_tools():
    """pip and apt have their own defaults and configuration: the image names no host."""
    code = "\n".join(line for line in (REPO_ROOT / "containers" / "Dockerfile").read_text().splitlines()
                     if not line.lstrip().startswith("#"))
    assert "://" not in code and "--index-url" not in code
    assert "\nARG PIP_INDEX_URL\n" in code  # no default: set in RUN's environment only when given


def test_host_debian_mirror_reads_both_apt_source_formats(tmp_path):
    apt = tmp_path / "etc" / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    assert host_debian_mirror("bookworm", tmp_path) is None
    (apt / "sources.list").write_text("# deb http://old.example/debian bookworm main\n"
                                      "deb-src http://src.example/debian bookworm main\n"
                                      "deb [arch=amd64] http://list.example/debian trixie main\n")
    (apt / "sources.list.d" / "x.list.disabled").write_text("deb http://off.example/debian bookworm main\n")
    assert host_debian_mirror("bookworm", tmp_path) is None
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb deb-src\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    assert host_debian_mirror("bookworm", tmp_path) == "http://mirror.example/debian"
    assert host_debian_mirror("trixie", tmp_path) == "http://list.example/debian"


def test_dockerignore_keeps_heavy_dirs_out_of_the_context():
    from docker.utils.build import exclude_paths

    patterns = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p for p in patterns if p.strip() and not p.startswith("#")]
    excluded = exclude_paths(str(REPO_ROOT), patterns, dockerfile="containers/Dockerfile")
    included = {p.split("/")[0] for p in excluded}
    assert {".venv", ".git", "results", "resources", "tests"}.isdisjoint(included)
    assert {"src", "containers", "constraints.txt", "pyproject.toml"} <= included


def test_slurm_profile_uses_the_image_through_apptainer():
    profile = yaml.safe_load((REPO_ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["software-deployment-method"] == "apptainer"
    assert profile["apptainer-args"].startswith("--nv")
    assert ":/workspace" in profile["apptainer-args"] and ":/cache" in profile["apptainer-args"]
    assert {"runtime", "mem_mb"} <= set(profile["default-resources"])


# --------------------------------------------------------------------------- a real engine

ENGINE_DIR = Path("/run/visae-test-docker")
ENGINE_SOCK = f"unix://{ENGINE_DIR}/docker.sock"
ENGINE_DATA = Path(os.environ.get("VISAE_TEST_DOCKER_ROOT", "/var/lib/visae-test-docker"))
TEST_SUITE = "bookworm"


def host_debian_mirror(suite: str, root: Path = Path("/")) -> str | None:
    """The first `deb` source of the host's apt (one-line .list or deb822 .sources) that serves
    `suite`, or None (then debootstrap uses its own default mirror)."""
    apt = root / "etc" / "apt"
    entries = []  # (types, uris, suites)
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3:
                    entries.append(([words[0]], [words[1]], [words[2]]))
    for path in sorted((apt / "sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields = dict(re.findall(r"^([\w-]+):\s*(.*)$", stanza, re.M))
            if fields.get("Enabled", "yes").lower() != "no":
                entries.append(tuple(fields.get(k, "").split() for k in ("Types", "URIs", "Suites")))
    for types, uris, suites in entries:
        if "deb" in types and suite in suites and uris:
            return uris[0]
    return None


DEBIAN_MIRROR = os.environ.get("VISAE_DEBIAN_MIRROR") or host_debian_mirror(TEST_SUITE)
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
TEST_IMAGE = "visae-test:light"


def _ping(host: str) -> bool:
    try:
        docker.DockerClient(base_url=host, timeout=5).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def engine():
    """DOCKER_HOST of a running engine: one already running, or a dockerd this test starts."""
    for host in filter(None, (os.environ.get("DOCKER_HOST"), "unix:///var/run/docker.sock", ENGINE_SOCK)):
        if _ping(host):
            yield host
            return
    if os.geteuid() != 0:
        pytest.skip("no Docker engine running, and starting dockerd needs root")
    dockerd = shutil.which("dockerd")
    if not dockerd:
        pytest.skip("no Docker engine running and no dockerd to start: apt-get install docker.io")
    ENGINE_DIR.mkdir(parents=True, exist_ok=True)
    log_path = ENGINE_DIR / "dockerd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [dockerd, "--iptables=false", "--bridge=none", "-H", ENGINE_SOCK,
             "--data-root", str(ENGINE_DATA), "--exec-root", str(ENGINE_DIR / "exec"),
             "--pidfile", str(ENGINE_DIR / "docker.pid")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while not _ping(ENGINE_SOCK):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            pytest.skip(f"dockerd did not start: {' | '.join(tail)}")
        time.sleep(0.2)
    try:
        yield ENGINE_SOCK
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def client(engine):
    return docker.DockerClient(base_url=engine, timeout=600)


@pytest.fixture(scope="session")
def base_image(client, tmp_path_factory):
    """A Debian bookworm base with python3 and git, debootstrapped here (no registry to pull from).

    The host's CA bundle replaces the base's, so pip reaches PyPI through a TLS-intercepting proxy;
    the tag carries the bundle's hash, and an engine that has the image already reuses it.
    """
    ca = HOST_CA.read_bytes() if HOST_CA.is_file() else b""
    tag = f"visae-test-base:bookworm-{hashlib.sha256(ca).hexdigest()[:12]}"
    try:
        client.images.get(tag)
        return tag
    except ImageNotFound:
        pass
    debootstrap = shutil.which("debootstrap")
    if not debootstrap or os.geteuid() != 0:
        pytest.skip("no base image and no way to make one: needs root and debootstrap "
                    "(apt-get install debootstrap)")
    rootfs = tmp_path_factory.mktemp("rootfs")
    t0 = time.monotonic()
    try:
        subprocess.run(
            [debootstrap, "--variant=minbase",
             "--include=python3,python3-venv,git,ca-certificates",
             TEST_SUITE, str(rootfs), *([DEBIAN_MIRROR] if DEBIAN_MIRROR else [])],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        if ca:
            (rootfs / "etc/ssl/certs/ca-certificates.crt").write_bytes(ca)
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        repo, _, version = tag.partition(":")
        client.api.import_image_from_stream(
            tar.stdout, repository=repo, tag=version,
            changes=["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        )
        assert tar.wait() == 0
        print(f"base image {tag}: debootstrap + import in {time.monotonic() - t0:.0f} s")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return tag


@pytest.fixture(scope="session")
def visae_image(client, base_image):
    """The project's own Dockerfile on the test base, light deps, host network for pip."""
    log = io.StringIO()
    t0 = time.monotonic()
    try:
        vc.build_image(
            client, context=REPO_ROOT, tag=TEST_IMAGE, network_mode="host", out=log,
            # pip's index only if the caller's environment names one
            buildargs={"BASE_IMAGE": base_image, "VISAE_DEPS": "light",
                       **{k: os.environ[k] for k in ("PIP_INDEX_URL",) if os.environ.get(k)}},
        )
    except VisaeError:
        print(log.getvalue()[-4000:], file=sys.stderr)
        raise
    print(f"image {TEST_IMAGE}: built in {time.monotonic() - t0:.0f} s")
    client.images.prune(filters={"dangling": True})  # earlier builds' layers
    return TEST_IMAGE


SNAKEFILE = """\
rule all:
    input: "results/hello.txt"

rule hello:
    output: "results/hello.txt"
    shell:
        "python -c 'import visae; print(visae.__name__)' > {output}; "
        "id -u >> {output}; "
        "echo $HF_HOME $HF_HUB_OFFLINE $MPLBACKEND >> {output}; "
        "mkdir -p $HF_HOME && touch $HF_HOME/probe"

rule fail:
    shell: "exit 3"

rule slow:
    output: "results/slow.txt"
    shell: "sleep 300 && touch {output}"
"""


@pytest.fixture
def user_repo(tmp_path):
    """A repo owned by the caller; as root, by an unprivileged 1234:1234 the run maps to."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Snakefile").write_text(SNAKEFILE)
    uid, gid = (1234, 1234) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    if os.geteuid() == 0:
        os.chown(repo, uid, gid)
        os.chown(repo / "Snakefile", uid, gid)
    return repo, uid, gid


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first one builds the base image and the image: ~3-4 min cold
def test_real_engine_build_via_cli_is_cached(engine, base_image, visae_image, monkeypatch, capfd):
    monkeypatch.setenv("DOCKER_HOST", engine)
    rc = visae(["container", "build", "--repo", str(REPO_ROOT), "--tag", TEST_IMAGE,
                "--base-image", base_image, "--deps", "light", "--network", "host"])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "Using cache" in out and "Successfully tagged visae-test:light" in out
    assert f"visae: built {TEST_IMAGE}" in err


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first one builds the base image and the image: ~3-4 min cold
def test_real_engine_run(engine, client, visae_image, user_repo, monkeypatch, capfd):
    repo, uid, gid = user_repo
    cache = repo.parent / "cache"
    monkeypatch.setenv("DOCKER_HOST", engine)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ["container", "run", "--image", visae_image, "--repo", str(repo), "--cache", str(cache),
            "--gpus", "0", "--network", "none", "--user", f"{uid}:{gid}", "--"]

    assert visae(base + ["--cores", "1"]) == 0
    _, err = capfd.readouterr()
    assert "2 of 2 steps (100%) done" in err  # snakemake's log is on stderr, kept apart
    hello = repo / "results" / "hello.txt"
    assert hello.read_text().split("\n")[:3] == ["visae", str(uid), "/cache/huggingface 1 Agg"]
    for path in (hello, hello.parent, repo / ".snakemake", cache / "huggingface" / "probe"):
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), path

    assert visae(base + ["-n"]) == 0
    out, err = capfd.readouterr()
    assert "Nothing to be done" in out + err  # a dry run logs to stdout

    assert visae(base + ["--cores", "1", "fail"]) == 1  # snakemake's own exit code
    assert client.containers.list(all=True, filters={"label": f"org.visae.repo={repo}"}) == []


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first one builds the base image and the image: ~3-4 min cold
def test_real_engine_ctrl_c_stops_and_removes(engine, client, visae_image, user_repo):
    """Ctrl-C as a terminal sends it: SIGINT to a separate `visae container run` process."""
    repo, uid, gid = user_repo
    label = {"label": f"org.visae.repo={repo}"}
    cmd = [sys.executable, "-m", "visae.cli", "container", "run", "--image", visae_image, "--repo", str(repo),
           "--cache", str(repo.parent / "cache"), "--gpus", "0", "--network", "none",
           "--user", f"{uid}:{gid}", "--", "--cores", "1", "slow"]
    # A shell without job control starts background jobs with SIGINT ignored, and children
    # inherit that; a terminal's foreground process has the default, which is what we test.
    proc = subprocess.Popen(cmd, env={**os.environ, "DOCKER_HOST": engine},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not client.containers.list(filters={**label, "status": "running"}):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(3)  # let snakemake start the job
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=vc.STOP_GRACE_S + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert "visae: interrupted" in err
    assert time.monotonic() - t0 < vc.STOP_GRACE_S + 20
    assert client.containers.list(all=True, filters=label) == []
    assert not (repo / "results" / "slow.txt").exists()
