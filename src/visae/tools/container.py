"""`visae container build|run`: the CUDA image and a docker-py launcher for Snakemake in it.

Why a launcher and not a `docker run` line in the README: the flags that make a run correct
(GPU device requests, the repo mounted at a fixed path, the caller's uid:gid so outputs are not
root-owned, enough shared memory for DataLoader workers, a persistent weight cache, the
pass-through of HF/W&B settings) are easy to get subtly wrong by hand. `run_spec` builds them
in one pure function, which the tests check exactly.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from visae.errors import VisaeError

DEFAULT_IMAGE = "visae:latest"
DOCKERFILE = "containers/Dockerfile"
WORKSPACE = "/workspace"  # where the repo is mounted; the image's WORKDIR and git safe.directory
CACHE_MOUNT = "/cache"  # HF_HOME, TORCH_HOME and XDG_CACHE_HOME live under it in the image
DEFAULT_CACHE = Path("~/.cache/visae")
DEFAULT_SHM = "8g"
STOP_GRACE_S = 30

# Host variables a run needs to behave like it would on the host (offline mode, tokens,
# experiment tracking, GPU selection); copied only when set, never given a default.
PASS_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_TOKEN",
    "HF_ENDPOINT",
    "CUDA_VISIBLE_DEVICES",
)
PASS_ENV_PREFIXES = ("WANDB_", "VISAE_")


# --------------------------------------------------------------------------- the spec


def device_requests(gpus: str | int | None) -> list[Any]:
    """GPUs as docker device requests: "all", a count N, "0"/None for none, or "device=0,2"."""
    from docker.types import DeviceRequest

    caps = [["gpu"]]
    value = "0" if gpus is None else str(gpus).strip().lower()
    if value in ("0", "none", ""):
        return []
    if value == "all":
        return [DeviceRequest(count=-1, capabilities=caps)]
    if value.startswith("device="):
        ids = [d.strip() for d in value.removeprefix("device=").split(",") if d.strip()]
        if not ids:
            raise VisaeError(f"--gpus {gpus!r}: give device ids, e.g. device=0,1")
        return [DeviceRequest(device_ids=ids, capabilities=caps)]
    if value.isdigit():
        return [DeviceRequest(count=int(value), capabilities=caps)]
    raise VisaeError(f"--gpus {gpus!r}: expected all, a number of GPUs, 0 for none, or device=ID,ID")


def passthrough_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The subset of the host environment that is forwarded into the container."""
    return {
        k: v
        for k, v in sorted(environ.items())
        if k in PASS_ENV or any(k.startswith(p) for p in PASS_ENV_PREFIXES)
    }


def run_spec(
    *,
    image: str,
    args: Iterable[str],
    repo: Path,
    cache: Path,
    uid: int,
    gid: int,
    gpus: str | int | None = "all",
    shm_size: str | int = DEFAULT_SHM,
    network: str | None = None,
    environ: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    name: str | None = None,
    username: str = "visae",
) -> dict[str, Any]:
    """Keyword arguments for `client.containers.create`: one place that says how visae runs.

    Pure (no Docker calls, no environment reads), so the tests can check it exactly.
    """
    env = passthrough_env(os.environ if environ is None else environ)
    # The caller's uid has no passwd entry in the image; getpass.getuser() (snakemake, torch)
    # then needs USER or it raises.
    env["USER"] = username
    # tini (init below) then signals snakemake's whole process group, as a terminal's Ctrl-C
    # does: snakemake waits for its jobs, so they must get the SIGINT too.
    env["TINI_KILL_PROCESS_GROUP"] = "1"
    env.update(extra_env or {})
    spec: dict[str, Any] = {
        "image": image,
        # No args: the image's CMD (`--cores all`) after its ENTRYPOINT (`snakemake`).
        "command": list(args) or None,
        "working_dir": WORKSPACE,
        "user": f"{uid}:{gid}",
        "volumes": {
            str(Path(repo).resolve()): {"bind": WORKSPACE, "mode": "rw"},
            str(Path(cache).resolve()): {"bind": CACHE_MOUNT, "mode": "rw"},
        },
        "device_requests": device_requests(gpus),
        "shm_size": shm_size,
        "environment": env,
        # tini as PID 1: forwards Ctrl-C to snakemake (which then removes incomplete outputs)
        # and reaps the job processes snakemake leaves behind.
        "init": True,
        "stdin_open": False,
        "tty": False,
        # Removed by the launcher after it has read the exit code, not by the daemon, which
        # could remove it before `wait` returns.
        "auto_remove": False,
        "labels": {"org.visae.repo": str(Path(repo).resolve())},
    }
    if network:
        spec["network_mode"] = network
    if name:
        spec["name"] = name
    return spec


# --------------------------------------------------------------------------- docker calls


def connect():
    """A docker-py client for the daemon in DOCKER_HOST (or the default socket), or one line."""
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env()
        client.ping()
    except DockerException as err:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise VisaeError(
            f"no Docker daemon at {where}: start dockerd (or set DOCKER_HOST) and check you may "
            f"use its socket ({_one_line(err)})"
        ) from err
    return client


def _one_line(err: BaseException) -> str:
    text = getattr(err, "explanation", None) or str(err)
    text = text.decode() if isinstance(text, bytes) else str(text)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _translate(err: Exception, image: str) -> VisaeError:
    """Docker's errors for the cases users hit, as one actionable line."""
    from docker.errors import ImageNotFound, NotFound

    msg = _one_line(err)
    if isinstance(err, ImageNotFound) or (
        isinstance(err, NotFound) and "image" in msg.lower()
    ):
        return VisaeError(f"image {image} not found: run `visae container build`")
    if "device driver" in msg or "nvidia" in msg.lower():
        return VisaeError(
            "no NVIDIA container runtime for the GPU request: install nvidia-container-toolkit "
            f"and restart dockerd, or run without GPUs with --gpus 0 (docker: {msg})"
        )
    return VisaeError(f"docker: {msg}")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """A SIGTERM to the launcher (a scheduler, CI) cleans up like Ctrl-C does."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write(stream: IO, data: bytes) -> None:
    buf = getattr(stream, "buffer", None)
    if buf is not None:
        buf.write(data)
    else:
        stream.write(data.decode(errors="replace"))
    stream.flush()


def run_container(
    client, spec: Mapping[str, Any], *, stdout: IO | None = None, stderr: IO | None = None
) -> int:
    """Create, start, stream and remove one container; its exit code is the return value.

    Ctrl-C sends SIGINT to snakemake (so it can mark incomplete outputs), waits a grace period,
    then removes the container either way.
    """
    from docker.errors import DockerException, NotFound

    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    image = spec.get("image", DEFAULT_IMAGE)
    try:
        container = client.containers.create(**spec)
    except DockerException as err:
        raise _translate(err, image) from err
    try:
        with _sigterm_as_interrupt():
            try:
                # Attach before start so not a byte of output is missed; demux keeps
                # snakemake's stderr on our stderr.
                output = container.attach(stdout=True, stderr=True, stream=True, logs=True, demux=True)
                container.start()
                for out, err in output:
                    if out:
                        _write(stdout, out)
                    if err:
                        _write(stderr, err)
                result = container.wait()
            except KeyboardInterrupt:
                _interrupt(container)
                raise
            except DockerException as err:
                raise _translate(err, image) from err
        return int(result.get("StatusCode", 1))
    finally:
        try:
            container.remove(force=True)
        except NotFound:
            pass
        except DockerException as err:  # never hide the real outcome behind a cleanup error
            print(f"visae: warning: could not remove container: {_one_line(err)}", file=stderr)


def _interrupt(container) -> None:
    from docker.errors import DockerException

    print("visae: interrupted, stopping the container", file=sys.stderr)
    try:
        container.kill(signal="SIGINT")
        container.wait(timeout=STOP_GRACE_S)
    except Exception:  # timeout, already gone, or a second Ctrl-C: remove(force) follows
        try:
            container.stop(timeout=1)
        except DockerException:
            pass


def build_image(
    client,
    *,
    context: Path,
    dockerfile: str = DOCKERFILE,
    tag: str = DEFAULT_IMAGE,
    buildargs: Mapping[str, str] | None = None,
    network_mode: str | None = None,
    nocache: bool = False,
    pull: bool = False,
    out: IO | None = None,
) -> str:
    """Build with the classic builder (docker-py has no BuildKit), streaming the log; the image id."""
    from docker.errors import DockerException

    out = out or sys.stdout
    if not (Path(context) / dockerfile).is_file():
        raise VisaeError(f"no {dockerfile} under {context}: run from the visae repo or pass --repo")
    image_id = ""
    try:
        chunks = client.api.build(
            path=str(context),
            dockerfile=dockerfile,
            tag=tag,
            buildargs=dict(buildargs or {}),
            network_mode=network_mode,
            nocache=nocache,
            pull=pull,
            rm=True,
            forcerm=True,
            decode=True,
        )
        for chunk in chunks:
            if "error" in chunk:
                detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                raise VisaeError(f"docker build failed: {_one_line(RuntimeError(detail))}")
            if "stream" in chunk:
                out.write(chunk["stream"])
            elif "status" in chunk:
                out.write(" ".join(str(chunk[k]) for k in ("status", "progress") if chunk.get(k)) + "\n")
            aux = chunk.get("aux") or {}
            if "ID" in aux:
                image_id = aux["ID"]
            out.flush()
    except DockerException as err:
        raise VisaeError(f"docker build failed: {_one_line(err)}") from err
    return image_id or client.images.get(tag).id


# --------------------------------------------------------------------------- CLI


def find_repo(start: Path | None = None) -> Path:
    """The repo to mount/build: the nearest ancestor with a Snakefile, containers/ or .git."""
    start = (start or Path.cwd()).resolve()
    for d in (start, *start.parents):
        if (d / "Snakefile").is_file() or (d / DOCKERFILE).is_file() or (d / ".git").exists():
            return d
    return start


def _key_values(items: list[str] | None, what: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not key:
            raise VisaeError(f"{what} {item!r}: expected KEY=VALUE")
        if not sep:  # `--env NAME`: the host's value, like docker's -e NAME
            if key not in os.environ:
                continue
            value = os.environ[key]
        result[key] = value
    return result


def _user(value: str | None) -> tuple[int, int]:
    if value is None:
        return os.getuid(), os.getgid()
    m = re.fullmatch(r"(\d+)(?::(\d+))?", value.strip())
    if not m:
        raise VisaeError(f"--user {value!r}: expected UID or UID:GID (numbers)")
    uid = int(m.group(1))
    return uid, int(m.group(2)) if m.group(2) else uid


def _username(uid: int) -> str:
    """The name logs and provenance show for the run: the host's, for the uid the run uses."""
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return os.environ.get("USER") or f"uid{uid}"


def cmd_container_build(args: argparse.Namespace) -> int:
    repo = Path(args.repo).resolve() if args.repo else find_repo()
    buildargs = _key_values(args.build_arg, "--build-arg")
    if args.base_image:
        buildargs["BASE_IMAGE"] = args.base_image
    if args.deps:
        buildargs["VISAE_DEPS"] = args.deps
    network = None if args.network == "default" else args.network
    image_id = build_image(
        connect(),
        context=repo,
        dockerfile=args.dockerfile,
        tag=args.tag,
        buildargs=buildargs,
        network_mode=network,
        nocache=args.no_cache,
        pull=args.pull,
    )
    print(f"visae: built {args.tag} ({image_id})", file=sys.stderr)
    return 0


def cmd_container_run(args: argparse.Namespace) -> int:
    repo = Path(args.repo).resolve() if args.repo else find_repo()
    if not repo.is_dir():
        raise VisaeError(f"--repo {repo}: not a directory")
    cache = Path(args.cache).expanduser() if args.cache else DEFAULT_CACHE.expanduser()
    uid, gid = _user(args.user)
    # Made here, by the caller, so it is theirs and not a root-owned dir docker would create;
    # root running as another --user hands a new cache to that user, who must write to it.
    if not cache.is_dir():
        cache.mkdir(parents=True)
        if os.geteuid() == 0 and (uid, gid) != (0, 0):
            os.chown(cache, uid, gid)
    snakemake_args = list(args.snakemake_args or [])
    if snakemake_args[:1] == ["--"]:
        snakemake_args = snakemake_args[1:]
    spec = run_spec(
        image=args.image,
        args=snakemake_args,
        repo=repo,
        cache=cache,
        uid=uid,
        gid=gid,
        gpus=args.gpus,
        shm_size=args.shm_size,
        network=None if args.network == "default" else args.network,
        extra_env=_key_values(args.env, "--env"),
        name=args.name,
        username=_username(uid),
    )
    return run_container(connect(), spec)


def add_cli(sub) -> None:
    p = sub.add_parser("container")
    csub = p.add_subparsers(dest="container_command", metavar="<build|run>", required=True)

    b = csub.add_parser("build", help="build the image from containers/Dockerfile")
    b.add_argument("--repo", help="repo root, the build context (default: found from cwd)")
    b.add_argument("--tag", "-t", default=DEFAULT_IMAGE, help=f"image tag (default {DEFAULT_IMAGE})")
    b.add_argument("--dockerfile", default=DOCKERFILE, help="relative to the repo root")
    b.add_argument("--base-image", help="BASE_IMAGE build arg (default: the Dockerfile's CUDA base)")
    b.add_argument("--deps", choices=["full", "light"], help="VISAE_DEPS build arg (default full)")
    b.add_argument("--build-arg", action="append", metavar="KEY=VALUE", help="repeatable")
    b.add_argument("--network", default="default", choices=["default", "host", "none"],
                   help="network for RUN steps (host where the daemon has no bridge)")
    b.add_argument("--no-cache", action="store_true")
    b.add_argument("--pull", action="store_true", help="pull a newer base image first")
    b.set_defaults(func=cmd_container_build)

    r = csub.add_parser(
        "run",
        help="run snakemake in the image on this repo",
        description="Everything after `--` goes to snakemake, e.g. `visae container run -- -n`.",
    )
    r.add_argument("--image", default=DEFAULT_IMAGE)
    r.add_argument("--repo", help="repo to mount at /workspace (default: found from cwd)")
    r.add_argument("--gpus", default="all", help="all (default), a count, 0 for none, or device=0,1")
    r.add_argument("--shm-size", default=DEFAULT_SHM, help=f"shared memory (default {DEFAULT_SHM})")
    r.add_argument("--cache", help=f"host folder mounted at {CACHE_MOUNT} (default ~/.cache/visae)")
    r.add_argument("--network", default="default", choices=["default", "host", "none", "bridge"])
    r.add_argument("--user", help="UID[:GID] to run as (default: yours)")
    r.add_argument("--env", "-e", action="append", metavar="KEY[=VALUE]", help="extra env, repeatable")
    r.add_argument("--name", help="container name")
    r.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="-- then snakemake's arguments")
    r.set_defaults(func=cmd_container_run)
