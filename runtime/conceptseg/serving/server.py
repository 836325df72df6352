"""``conceptseg serve``: the real Triton server on a generated model repository.

The server is the ``tritonserver`` binary (2.51.0, with the Python backend) from the
``nvidia-pytriton`` wheel. Everything it needs is made per run in a temporary directory:

- ``repo/``: the model repository for the profile (``conceptseg.serving.repository``), checked
  against the engine manifests before the server starts;
- ``backends/python/``: the wheel's Python backend with the ``triton_python_backend_stub`` for
  this Python (``python_backend_stubs/3.11/``) copied beside it, where the backend looks for it;
- ``stub-env/``: a virtual environment the stub embeds Python from. The stub resolves its
  interpreter as ``python3`` on ``PATH`` (so this env's ``bin`` goes first) and reads its
  ``pyvenv.cfg``; a ``.pth`` file puts numpy 1.26 (``.venv/triton-stub-site``) ahead of this
  venv's site-packages, which come next with the editable ``conceptseg``. The stub's pybind11
  predates numpy 2 (it reads numpy-1 dtype structs: BYTES tensors crash, numbers come out wrong),
  so the stub must not see numpy 2; this process and the client keep numpy 2.

``LD_LIBRARY_PATH`` gets this interpreter's ``libpython3.11.so`` directory first (the stub links
``libpython3.11.so.1.0``) and the wheel's ``nvidia_pytriton.libs``. Addresses default to
127.0.0.1; the server runs in its own session so Ctrl-C here stops it cleanly (SIGINT, then the
whole group after ``exit_timeout``), and it gets SIGTERM if this process dies without stopping it.

Closed by default: shared-memory registration, logging, trace, statistics, model configs and the
model repository (load/unload) answer only requests carrying the header ``conceptseg-api-key``
(gRPC metadata ``triton-grpc-protocol-conceptseg-api-key``), key from ``CONCEPTSEG_API_KEY`` or
generated per run; health, metadata and inference stay open. The Python backend's regions get a
per-run name prefix (still starting with Triton's default, which 25.07+ refuses to register) so
the supervisor (``conceptseg.serving.supervisor``) can make them 0600 and ``stop`` can remove them.
A crashed server's log is kept (``Server.kept_log``).
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import conceptseg
from conceptseg import gpu_stack
from conceptseg.models.engines import find_plans
from conceptseg.serving import supervisor
from conceptseg.serving.repository import (
    RepoOptions,
    TemplateError,
    build_repository,
    validate_repository,
)
from conceptseg.serving.serve_config import LOCALHOST, ServeConfig
from conceptseg.types import RequestError

STUB_SITE = Path(sys.prefix) / "triton-stub-site"  # numpy<2 for the stub (Makefile installs it)
API_KEY_HEADER = "conceptseg-api-key"
GRPC_KEY_HEADER = f"triton-grpc-protocol-{API_KEY_HEADER}"  # Triton's gRPC metadata form
# Triton's restricted-API categories that need the key; health, metadata, inference stay open
RESTRICTED = (
    "shared-memory", "logging", "trace", "statistics", "model-config", "model-repository",
)  # fmt: skip
SHM_PREFIX = "triton_python_backend_shm_region_"  # Triton's default (25.07+ refuses to register it)
LOG_DIR = Path(tempfile.gettempdir())  # where a crashed server's log is kept


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel put the server: binary, backends, stubs and bundled libraries."""

    root: Path  # .../site-packages/pytriton/tritonserver
    libs: Path  # .../site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def stub(self) -> Path:
        major, minor = sys.version_info[:2]
        return (
            self.root / "python_backend_stubs" / f"{major}.{minor}" / "triton_python_backend_stub"
        )


def find_triton() -> TritonInstall:
    """The ``tritonserver`` of the installed ``nvidia-pytriton`` wheel, or RequestError."""
    site = Path(sysconfig.get_paths()["purelib"])
    install = TritonInstall(site / "pytriton" / "tritonserver", site / "nvidia_pytriton.libs")
    if not install.binary.exists() or not install.stub.exists():
        raise RequestError(
            "serve",
            f"no tritonserver with a Python {sys.version_info[0]}.{sys.version_info[1]} stub in "
            f"{install.root}; run `make install` (pip install --no-deps nvidia-pytriton==0.5.13)",
        )
    if not STUB_SITE.joinpath("numpy").is_dir():
        raise RequestError(
            "serve",
            f"{STUB_SITE} has no numpy 1.26 for the backend stub; run `make install` "
            f"(pip install --no-deps --target {STUB_SITE} numpy==1.26.4)",
        )
    return install


def prepare_backends(install: TritonInstall, dest: Path) -> Path:
    """``dest/python``: the wheel's Python backend with this Python's stub beside it."""
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (python / name).symlink_to(install.root / "backends" / "python" / name)
    shutil.copy2(install.stub, python / "triton_python_backend_stub")
    return dest


def prepare_stub_env(dest: Path) -> Path:
    """A venv over this one whose ``python3`` the stub finds on PATH; numpy 1.26 goes first,
    then the source root of the ``conceptseg`` this process runs (so the models import the same
    code as the launcher, whatever checkout it comes from), then this venv's site-packages."""
    venv.create(dest, with_pip=False, symlinks=True, clear=True)
    site = Path(sysconfig.get_paths(vars={"base": str(dest), "platbase": str(dest)})["purelib"])
    ours = sysconfig.get_paths()["purelib"]
    source = Path(conceptseg.__file__).resolve().parents[1]
    (site / "_conceptseg_stub.pth").write_text(
        f"{STUB_SITE}\n{source}\nimport site; site.addsitedir({ours!r})\n"
    )
    return dest


def server_env(install: TritonInstall, stub_env: Path) -> dict[str, str]:
    env = dict(os.environ)  # the child's environment; nothing here is configuration
    env["PATH"] = f"{stub_env / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [libdir, str(install.libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
    env.pop("PYTHONHOME", None)
    env.pop("VIRTUAL_ENV", None)
    env.pop("CONCEPTSEG_API_KEY", None)  # the server gets it on its command line only
    # glibc makes up to 8 heap arenas per core, one per thread that contends; each keeps its
    # freed pages, so a stub's RSS grows with its thread count (orchestrator.trim_heap)
    env.setdefault("MALLOC_ARENA_MAX", "2")
    return env


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: the child may not import or load
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM (Triton's clean shutdown) when this process dies, so a
    killed ``serve`` or test run never leaves a server behind (Linux ``prctl``); SIGINT back to
    its default (``stop`` sends it; an ignored SIGINT would be inherited through exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = LOCALHOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _restricted(key: str) -> list[str]:
    apis = ",".join(RESTRICTED)
    return [
        f"--http-restricted-api={apis}:{API_KEY_HEADER}={key}",
        f"--grpc-restricted-protocol={apis}:{API_KEY_HEADER}={key}",
    ]


def has_flag(binary: Path, env: dict[str, str], flag: str) -> bool:
    """Whether ``tritonserver --help`` lists ``flag`` (options that came after 2.51)."""
    try:
        shown = subprocess.run(
            [str(binary), "--help"], env=env, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return flag in shown.stdout + shown.stderr


def _command(
    cfg: ServeConfig, binary: Path, repo: Path, backends: Path, key: str, prefix: str
) -> list[str]:
    cmd = [str(binary), f"--model-repository={repo}", f"--backend-directory={backends}"]
    for kind, port in (
        ("http", cfg.http_port),
        ("grpc", cfg.grpc_port),
        ("metrics", cfg.metrics_port),
    ):
        cmd += [f"--{kind}-address={cfg.host}", f"--{kind}-port={port}"]
    cmd += [
        f"--model-control-mode={cfg.model_control}",
        f"--exit-timeout-secs={cfg.exit_timeout_s}",
        f"--log-verbose={cfg.log_verbose}",
        "--strict-readiness=true",
        "--disable-auto-complete-config",
        f"--backend-config=python,shm-region-prefix-name={prefix}",
        *_restricted(key),
    ]
    if cfg.model_control == "explicit":
        cmd.append("--load-model=*")
    return cmd


def check_plan_tensorrt(plans: Path) -> None:
    """Every ``<graph>.plan.json`` in ``plans`` records the deployment container's TensorRT (a
    plan deserializes only in the TensorRT that built it), or RequestError in one line."""
    want = gpu_stack.load()["tensorrt"]
    for record in sorted(Path(plans).glob("*.plan.json")):
        built = json.loads(record.read_text()).get("tensorrt_version", "unknown")
        if built != want:
            raise RequestError(
                "--plans",
                f"{record.name} was built by TensorRT {built}; the container has TensorRT {want}: "
                f"rebuild with `{gpu_stack.load().rebuild_hint()}`",
            )


class Server:
    """A running ``tritonserver``; ``start`` returns once every model is ready."""

    def __init__(self, cfg: ServeConfig) -> None:
        self.cfg = cfg
        self.workdir = Path(tempfile.mkdtemp(prefix="conceptseg-triton-"))
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.api_key = cfg.api_key or secrets.token_urlsafe(24)
        self.region_prefix = f"{SHM_PREFIX}cs{secrets.token_hex(4)}_"
        self.supervisor: supervisor.Supervisor | None = None
        self.kept_log: Path | None = None  # where the log of a server that crashed was kept
        self.on_event: Any = lambda line: None  # supervisor messages (serve prints them)
        self.on_dead: Any = lambda event: None  # a stub died and cannot be reloaded

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers that open the restricted APIs (gRPC: ``grpc_headers``)."""
        return {API_KEY_HEADER: self.api_key}

    @property
    def grpc_headers(self) -> dict[str, str]:
        return {GRPC_KEY_HEADER: self.api_key}

    def prepare(self) -> list[str]:
        """Repository, backends and stub env in the work dir; the server command line."""
        cfg = self.cfg
        if cfg.profile not in ("cpu", "gpu"):
            raise RequestError("--profile", f"{cfg.profile!r}: choose cpu or gpu")
        engines = Path(cfg.engines).resolve()
        if not (engines / "manifest.json").exists():
            raise RequestError(
                "--engines",
                f"{engines} has no manifest.json; run `conceptseg export --out {engines}`",
            )
        plans = cfg.plans
        if cfg.profile == "gpu" and plans is None:
            plans = find_plans(engines)
        if cfg.profile == "gpu":
            check_plan_tensorrt(Path(plans))
        external = cfg.tritonserver is not None
        if external != (cfg.backend_dir is not None):
            raise RequestError(
                "--tritonserver/--backend-dir",
                "give both (another Triton build) or neither (the pytriton wheel's server)",
            )
        for flag, value, least in (("--mllm-slots", cfg.mllm_slots, 0),
                                   ("--mllm-queue", cfg.mllm_queue, 0),
                                   ("--mllm-prefill-chunk", cfg.mllm_prefill_chunk, 1)):  # fmt: skip
            if value < least:
                raise RequestError(flag, f"{value} must be >= {least}")
        install = None if external else find_triton()
        opts = RepoOptions(
            orchestrator_instances=cfg.orchestrator_instances,
            engine_threads=cfg.engine_threads,
            pipeline_config=cfg.pipeline_config,
            mllm_backend=cfg.mllm_backend,
            mllm_precision=cfg.mllm_precision,
            mllm_path=cfg.mllm_path,
            sam3_precision=cfg.sam3_precision,
            engine_runtime=cfg.engine_runtime,
            mllm_slots=cfg.mllm_slots,
            mllm_queue=cfg.mllm_queue,
            mllm_prefill_chunk=cfg.mllm_prefill_chunk,
        )
        try:
            repo = build_repository(cfg.profile, engines, self.workdir / "repo", opts, plans)
            problems = validate_repository(repo, engines, cfg.profile, plans)
        except TemplateError as exc:
            flags = (
                "--engines/--plans/--mllm-path" if cfg.profile == "gpu" else "--engines/--mllm-path"
            )
            raise RequestError(flags, str(exc)) from None
        if problems:
            raise RequestError(
                "--engines", "the generated repository is invalid: " + "; ".join(problems)
            )
        if install is None:  # e.g. the NGC container: its own stub and Python, this package in it
            assert cfg.tritonserver is not None and cfg.backend_dir is not None
            self.env = dict(os.environ)
            command = self._command(Path(cfg.tritonserver), repo, Path(cfg.backend_dir))
            if has_flag(Path(cfg.tritonserver), self.env, "--http-max-input-size"):
                command.append(f"--http-max-input-size={self.max_input_bytes()}")
            return command
        if cfg.profile == "gpu":
            raise RequestError(
                "--profile gpu",
                "the pytriton wheel's server has only the python backend; give --tritonserver "
                "and --backend-dir of a Triton build with the tensorrt backend: the deployment "
                f"image {gpu_stack.load().image} (FROM {gpu_stack.load().triton_image})",
            )
        backends = prepare_backends(install, self.workdir / "backends")
        self.env = server_env(install, prepare_stub_env(self.workdir / "stub-env"))
        return self._command(install.binary, repo, backends)  # 2.51: no --http-max-input-size

    def _command(self, binary: Path, repo: Path, backends: Path) -> list[str]:
        return _command(self.cfg, binary, repo, backends, self.api_key, self.region_prefix)

    def max_input_bytes(self) -> int:
        """The biggest input a valid request has: 4 reference images at the byte limit (+1 MiB)."""
        limit = int(self.cfg.pipeline_config.get("max_image_bytes", 32 << 20))
        return self.cfg.max_input_bytes or 4 * limit + (1 << 20)

    def start(self) -> Server:
        try:
            command = self.prepare()
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    start_new_session=True,  # Ctrl-C reaches us only; we stop the server in order
                    preexec_fn=_die_with_parent,
                )
            self.wait_ready()
            if self.cfg.supervise:
                self.supervisor = supervisor.Supervisor(
                    self.process.pid,
                    supervisor.Repository(
                        f"http://{self.cfg.host}:{self.cfg.http_port}", self.headers
                    ),  # fmt: skip
                    region_prefix=self.region_prefix,
                    interval_s=self.cfg.health_interval_s,
                    can_reload=self.cfg.model_control == "explicit",
                    on_event=lambda line: self.on_event(line),
                    on_dead=lambda event: self.on_dead(event),
                )
                self.supervisor.check()  # the stubs as they are now, the regions made 0600
                self.supervisor.start()
        except BaseException:
            self.stop()  # nothing left behind: process group, work dir
            raise
        return self

    def ready(self) -> bool:
        url = f"http://{self.cfg.host}:{self.cfg.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with {self.process.returncode} before it was ready:\n"
                    + self.log_tail()
                )
            if self.ready():
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"tritonserver not ready after {self.cfg.ready_timeout_s:.0f} s:\n" + self.log_tail()
        )

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:]) + f"\n(full log: {self.log_path})"

    def stop(self) -> int | None:
        """SIGINT (Triton's clean shutdown), then SIGKILL to the server's group; returns its code.

        The server's shared-memory files are removed. If it had exited by itself (a crash), its
        log is kept in ``LOG_DIR`` (``kept_log``) before the work dir goes."""
        process, code = self.process, None
        if self.supervisor is not None:
            self.supervisor.stop()
        crashed = process is not None and process.poll() is not None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                code = process.wait(timeout=self.cfg.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                code = process.wait()
        elif process is not None:
            code = process.returncode
        if process is not None:
            try:  # stubs left behind by a killed server are in its session's group
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            supervisor.remove_regions(self.region_prefix)
        if crashed and self.log_path.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.kept_log = LOG_DIR / f"conceptseg-tritonserver-{stamp}-{os.getpid()}.log"
            shutil.copyfile(self.log_path, self.kept_log)
            self.kept_log.chmod(0o600)
        shutil.rmtree(self.workdir, ignore_errors=True)
        self.process = None
        return code

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the server the way Ctrl-C does


def _run_once(server: Server) -> str:
    """One server from start to its end: "exited" (crash), "stub" (a stub died and cannot be
    reloaded: model control none). Ctrl-C / SIGTERM raise KeyboardInterrupt."""
    cfg, outcome = server.cfg, []
    server.on_event = lambda line: print(line, flush=True)
    server.on_dead = lambda event: outcome.append("stub")
    print(f"starting tritonserver ({cfg.profile} profile, engines {cfg.engines}) ...", flush=True)
    server.start()
    urls = cfg.urls
    print(f"ready: HTTP {urls['http']}  gRPC {urls['grpc']}  metrics {urls['metrics']}", flush=True)
    where = "CONCEPTSEG_API_KEY" if cfg.api_key else f"generated for this run: {server.api_key}"
    print(f"restricted APIs need header {API_KEY_HEADER} (key {where})", flush=True)
    print(f"repository and log: {server.workdir} (removed on exit); Ctrl-C stops", flush=True)
    while server.process is not None and server.process.poll() is None and not outcome:
        time.sleep(0.5)
    return outcome[0] if outcome else "exited"


def serve_forever(cfg: ServeConfig, max_restarts: int = 3) -> int:
    """Start, print the URLs, wait for Ctrl-C (or SIGTERM), stop. Returns the exit status.

    A server that crashes is restarted (at most ``max_restarts`` times), its log kept and
    printed; a stub death that cannot be repaired in place (model control none) stops it."""
    status, restarts = 0, 0
    previous = signal.signal(signal.SIGTERM, _interrupt)
    server: Server | None = None
    try:
        while True:
            server = Server(cfg)
            outcome = _run_once(server)
            code = server.stop()
            if outcome == "stub":
                print("a model's stub died and model control is none: stopped", flush=True)
                return 1
            print(f"tritonserver exited by itself (status {code}); log kept: {server.kept_log}",
                  flush=True)  # fmt: skip
            server = None
            if restarts >= max_restarts:
                return 1
            restarts += 1
            print(f"restarting ({restarts} of {max_restarts}) ...", flush=True)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:  # the server did not come up: its log says why
        print(f"error: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown
        signal.signal(signal.SIGTERM, previous)
        if server is not None and server.process is not None:
            print("stopping tritonserver ...", flush=True)
            code = server.stop()
            if code is not None:
                print(f"stopped (exit status {code})", flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return status
