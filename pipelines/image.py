"""`regmix image build`: the project's image from docker/Dockerfile, on any machine with a Docker
engine, including one that reaches no image registry or PyTorch index.

Where the default base (python:3.11-slim-bookworm on Docker Hub) cannot be pulled, the base is
made from Debian's own packages with debootstrap (Debian's mirror is the one source every
Debian machine reaches), with this machine's CA certificates inside, so that pip in the build
trusts the same TLS proxy the host does. Where the PyTorch CPU index is out of reach, a local
folder holding the pinned torch wheel is served to the build as a package index.
"""

import functools
import http.server
import os
import shutil
import subprocess
import tempfile
import threading
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

from regmix.errors import UserError
from regmix.probe import http_status

DEFAULT_BASE = "python:3.11-slim-bookworm"
DEBIAN_BASE = "regmix-base:bookworm"  # made here by debootstrap when DEFAULT_BASE is out of reach
DEBIAN_MIRROR = "http://deb.debian.org/debian"
HOST_CA_FOLDER = Path("/usr/local/share/ca-certificates")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
GPU_TORCH_INDEX = "https://pypi.org/simple"  # PyPI's Linux torch wheels are the CUDA build
DOCKER_HUB = "https://registry-1.docker.io/v2/"
LOCAL_INDEX_PORT = 38765  # where a local torch wheel folder is served to the build


class ImageError(UserError):
    """The image cannot be built here as asked; says what to install or pass."""


def local_image(gpu: bool = False) -> str:
    """The tag `regmix image build` gives, and `regmix run --runner docker` runs by default."""
    return f"regmix:{version('regmix')}{'' if gpu else '-cpu'}"


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether an HTTPS endpoint answers at all (any HTTP status counts: a registry's 401 too)."""
    try:
        http_status(url, timeout)
    except OSError:
        return False
    return True


def docker(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], check=False, **kwargs)


def check_engine() -> None:
    if shutil.which("docker") is None:
        raise ImageError("docker is not installed: apt-get install -y docker.io, then start the "
                         "engine with docker/engine.sh")
    if docker("info", capture_output=True).returncode != 0:
        raise ImageError("no Docker engine answers: start one with docker/engine.sh (no "
                         "systemd needed) or `systemctl start docker`")


def has_image(ref: str) -> bool:
    return docker("image", "inspect", ref, capture_output=True).returncode == 0


def debian_base(log) -> str:
    """DEBIAN_BASE, made once from Debian's packages (about 1.5 minutes, 190 MB)."""
    if has_image(DEBIAN_BASE):
        return DEBIAN_BASE
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        raise ImageError(f"{DEFAULT_BASE} cannot be pulled here and a Debian base needs root and "
                         "debootstrap: apt-get install -y debootstrap, run as root, or pass "
                         "--base IMAGE with Python 3.11")
    with tempfile.TemporaryDirectory(prefix="regmix-rootfs-") as rootfs:
        subprocess.run(["debootstrap", "--variant=minbase",
                        "--include=python3,python3-venv,python3-pip,ca-certificates",
                        "bookworm", rootfs, DEBIAN_MIRROR], check=True, stdout=log, stderr=log)
        for certificate in HOST_CA_FOLDER.glob("*.crt"):
            shutil.copy(certificate, Path(rootfs, "usr/local/share/ca-certificates"))
        subprocess.run(["chroot", rootfs, "update-ca-certificates"], check=True, stdout=log,
                       stderr=log)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        docker("import", "-", DEBIAN_BASE, stdin=tar.stdout, check=True, stdout=log)
        tar.wait()
    return DEBIAN_BASE


def local_torch_wheels() -> Path | None:
    """A folder pip is configured to find wheels in (PIP_FIND_LINKS) holding a torch wheel."""
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        if any(Path(folder).glob("torch-*.whl")):
            return Path(folder)
    return None


@contextmanager
def served_index(wheels: Path):
    """`wheels` as a package index (/simple/torch/ lists them) on a local port for the build,
    which runs on the host's network."""
    with tempfile.TemporaryDirectory(prefix="regmix-index-") as root:
        (Path(root) / "simple").mkdir()
        os.symlink(wheels.resolve(), Path(root, "simple", "torch"))
        handler = functools.partial(QuietHandler, directory=root)
        try:  # one fixed address: TORCH_INDEX is part of the torch layer's cache key
            server = http.server.ThreadingHTTPServer(("127.0.0.1", LOCAL_INDEX_PORT), handler)
        except OSError:  # taken: any port, at the price of reinstalling torch
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_port}/simple"
        finally:
            server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the build's own log says what was fetched
        pass


@contextmanager
def torch_index(gpu: bool, wheels: Path | None):
    """Where the build gets torch: a given wheel folder, else the default index, else a local
    wheel folder pip is configured with."""
    default = GPU_TORCH_INDEX if gpu else CPU_TORCH_INDEX
    wheels = wheels or (None if reachable(default) else local_torch_wheels())
    if wheels is None:
        if not reachable(default):
            raise ImageError(f"the torch index {default} is out of reach: pass --torch-wheels "
                             "DIR, a folder holding the torch wheel constraints.txt pins")
        yield default
        return
    if not any(wheels.glob("torch-*.whl")):
        raise ImageError(f"--torch-wheels: no torch-*.whl in {wheels}")
    with served_index(wheels) as url:
        yield url


def build_image(gpu: bool = False, tag: str | None = None, base: str | None = None,
                torch_wheels: Path | None = None, log_path: Path = Path("mlruns/image-build.log"),
                context: Path = Path(".")) -> str:
    """Build docker/Dockerfile's image; returns its reference. The build's output goes to
    `log_path` (docker's layer cache makes a rebuild after a source edit take seconds)."""
    check_engine()
    if not (context / "docker" / "Dockerfile").is_file():
        raise ImageError("run `regmix image build` from the regmix checkout (docker/Dockerfile "
                         "is its build recipe)")
    tag = tag or local_image(gpu)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        if base is None:
            base = DEFAULT_BASE if has_image(DEFAULT_BASE) or reachable(DOCKER_HUB) else debian_base(log)
        with torch_index(gpu, torch_wheels) as index:
            print(f"building {tag} from {base} (torch from {index}); log: {log_path}", flush=True)
            built = docker("build", "-f", "docker/Dockerfile", "-t", tag, "--network", "host",
                           "--build-arg", f"PYTHON_IMAGE={base}", "--build-arg", f"TORCH_INDEX={index}",
                           str(context), stdout=log, stderr=subprocess.STDOUT,
                           env={**os.environ, "DOCKER_BUILDKIT": "0"})
    if built.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise ImageError(f"docker build failed ({tail[0]}); the whole log: {log_path}")
    return tag
