"""Real NeMo Gym: start NeMo Gym's own servers (resources server, agent, `vllm_model` model server) with
its `gym env start` (the `ng_run` of older releases), pointed at our engine, and collect through the agent's `/run`.

nemo-gym needs Python >= 3.12 and brings Ray; it lives in its own venv (made here with a Python 3.12
interpreter, `pip install nemo-gym==VERSION uv`), and `gym env start` builds one uv venv per server inside it.
Everything `gym env start` starts stays in its process group; stopping sends SIGINT (its own shutdown: servers
and Ray), then kills by PID whatever of its process tree is left.

Config (sglgym/rollout/envs.yaml):
    nemo_gym_weather:
      type: nemo_gym
      config_paths: [resources_servers/example_single_tool_call/configs/example_single_tool_call.yaml]
      agent: example_single_tool_call_simple_agent      # server instance whose /run we call
      engine_url: http://127.0.0.1:30000                # or a list; default: EnvFleet(engine_urls=...)
      set: {...}                                         # extra NeMo Gym config keys (dotted) to merge
      dataset: {jsonl: resources_servers/example_single_tool_call/data/example.jsonl}
Relative paths resolve against the installed nemo-gym package root.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sglgym.procs import LOG_DIR, ServerProcess, descendants, free_port, start_process, stop_tree

from .config import EnvConfig
from .env import Env

VERSION = "0.4.0"
VENV_ROOT = Path(os.environ.get("SGLGYM_CACHE", Path.home() / ".cache" / "sglgym")) / "nemo-gym"
POLICY_CONFIG = "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml"
INSTALL_TIMEOUT_S = 1800   # measured: ~2.5 min for pip install nemo-gym on this project's 2-core machines


def python_candidates() -> list[str]:
    """Interpreters that may be Python >= 3.12, best first: $SGLGYM_PYTHON312, pyenv's real installs (not its
    shims: a shim runs pyenv's *global* version and exits 127 when that is not the one named), then PATH."""
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    installs = glob.glob(str(pyenv_root / "versions/3.*/bin/python3"))
    installs.sort(key=lambda p: _version_key(Path(p).parent.parent.name))
    on_path = [shutil.which(n) for n in ("python3.12", "python3.13", "python3.14", "python3")]
    ordered = [os.environ.get("SGLGYM_PYTHON312")] + installs + on_path
    return list(dict.fromkeys(c for c in ordered if c))


def _version_key(name: str) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.\-]", name)[:3])


def python_version(exe: str, timeout_s: float = 15.0) -> tuple[int, int] | None:
    """(major, minor) that `exe` reports when run, or None when it does not run (a broken shim exits 127)."""
    try:
        out = subprocess.run([exe, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True,
                             text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
        major, minor = (int(x) for x in out.stdout.split())
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return (major, minor) if out.returncode == 0 else None


def find_python312(candidates: list[str] | None = None) -> str | None:
    """The first candidate that runs and answers with a version >= 3.12 (each one is run: existing and
    executable is not enough)."""
    for exe in python_candidates() if candidates is None else candidates:
        version = python_version(exe)
        if version is not None and version >= (3, 12):
            return exe
    return None


def ensure_venv(version: str = VERSION, python: str | None = None, log=print) -> Path:
    """The venv with nemo-gym installed (created once, reused: `.complete` marks a finished install)."""
    venv = VENV_ROOT / f"venv-{version}"
    if (venv / ".complete").exists():
        return venv
    python = python or find_python312()
    if python is None:
        raise RuntimeError("nemo-gym needs Python >= 3.12 and none was found (set SGLGYM_PYTHON312)")
    if venv.exists():
        shutil.rmtree(venv)
    log(f"[nemo-gym] creating {venv} with {python} (first time: several minutes)")
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", f"nemo-gym=={version}", "uv"], check=True,
                   timeout=INSTALL_TIMEOUT_S)
    (venv / ".complete").write_text(version)
    return venv


def package_root(venv: Path) -> Path:
    """Where nemo-gym's resources_servers/, responses_api_agents/, ... live (site-packages)."""
    out = subprocess.run([str(venv / "bin/python"), "-c",
                          "import nemo_gym, os; print(os.path.dirname(os.path.dirname(nemo_gym.__file__)))"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def _instance(configs: list[dict], name: str) -> tuple[str, str]:
    """(server type, implementation) of a server instance: `name: {type: {impl: {...}}}`."""
    for c in configs:
        if name in c:
            kind = next(iter(c[name]))
            return kind, next(iter(c[name][kind]))
    raise KeyError(f"server instance {name!r} is not in the NeMo Gym configs")


@dataclass
class NemoGymRun:
    """The `gym env start` process of one env, what it serves, and how to start it again."""
    name: str
    server: ServerProcess | None
    agent_url: str
    ports: dict = field(default_factory=dict)
    cmd: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    cwd: Path | None = None
    startup_timeout_s: float = 600.0

    def start(self) -> None:
        self.server = start_process(f"nemo-gym-{self.name}", self.cmd, self.agent_url, env=self.env, cwd=self.cwd)
        try:
            _wait_ready(self, self.ports, self.startup_timeout_s)
        except BaseException:
            self.stop(grace_s=5.0)
            raise

    def healthy(self) -> bool:
        """`gym env start` runs and every one of its servers accepts connections."""
        return self.server.alive() and all(_accepts(port) for port in self.ports.values())

    def restart(self) -> None:
        """Stop what is left of the run and start it again on the same ports (the agent URL stays)."""
        self.stop(grace_s=10.0)
        self.start()

    def stop(self, grace_s: float = 30.0) -> None:
        proc = self.server.process
        # Seen before the shutdown: Ray daemons leave the group, and once their parent exits they are no
        # longer found under gym env start.
        tree = descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)          # gym env start's own shutdown: servers, Ray
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        stop_tree(self.server, grace_s=0.5, also=tree)   # whatever its shutdown left behind


def start_nemo_gym(cfg: EnvConfig, fleet) -> Env:
    """Start NeMo Gym's servers for `cfg` (see the module doc) and return an Env whose url is the agent's."""
    extra = cfg.extra
    engine_urls = extra.get("engine_url") or fleet.engine_urls
    engine_urls = [u.rstrip("/").removesuffix("/v1") for u in ([engine_urls] if isinstance(engine_urls, str)
                                                                else engine_urls)]
    if not engine_urls:
        raise ValueError(f"nemo_gym env {cfg.name!r}: needs engine_url (config key or EnvFleet(engine_urls=...))")
    api_key = extra.get("api_key") or getattr(fleet, "api_key", None) or "none"
    venv = ensure_venv(str(extra.get("version", VERSION)))
    root = package_root(venv)
    resolve = lambda p: str(p if Path(p).is_absolute() else root / p)  # noqa: E731
    paths = [resolve(p) for p in extra.get("config_paths", [])] + [resolve(extra.get("policy_config", POLICY_CONFIG))]
    loaded = [yaml.safe_load(Path(p).read_text()) for p in paths]
    agent = extra.get("agent")
    if not agent:
        raise ValueError(f"nemo_gym env {cfg.name!r}: name the agent server instance to call (agent: ...)")

    # Fixed ports for every instance, so we know where the agent listens.
    overlay: dict = {
        # several replicas: NeMo Gym's model server pins each rollout (its session) to one of them
        "policy_base_url": [f"{u}/v1" for u in engine_urls] if len(engine_urls) > 1 else f"{engine_urls[0]}/v1",
        "policy_api_key": api_key,
        "policy_model_name": extra.get("model_name", "default"),
        "head_server": {"host": "127.0.0.1", "port": free_port()},
        "uv_venv_dir": str(VENV_ROOT / "server-venvs"), "skip_venv_if_present": True,
    }
    ports = {}
    for c in loaded:
        for name in c:
            kind, impl = _instance([c], name)
            ports[name] = free_port()
            overlay.setdefault(name, {}).setdefault(kind, {})[impl] = {"host": "127.0.0.1", "port": ports[name]}
    for key, value in (extra.get("set") or {}).items():
        _set_dotted(overlay, key, value)
    for key in [k for k in cfg.dataset if k == "jsonl" or k.endswith("_jsonl")]:
        cfg.dataset[key] = resolve(cfg.dataset[key])
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    overlay_path = LOG_DIR / f"nemo-gym-{cfg.name}-{os.getpid()}.yaml"
    overlay_path.write_text(yaml.safe_dump(overlay))

    env = dict(os.environ)
    # uv must build the per-server venvs from this interpreter, not download one (no network for that)
    base_python = Path(os.path.realpath(venv / "bin/python")).parent
    env["PATH"] = f"{venv / 'bin'}:{base_python}:{env.get('PATH', '')}"
    env["UV_PYTHON_DOWNLOADS"] = "never"
    env["UV_PYTHON_PREFERENCE"] = "only-system"
    env.pop("PYTHONPATH", None)        # our venv's paths must not leak into NeMo Gym's
    env.setdefault("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    cmd = [str(venv / "bin/gym"), "env", "start"]
    for p in paths + [str(overlay_path)]:
        cmd += ["--config", p]
    agent_url = f"http://127.0.0.1:{ports[agent]}"
    # NeMo Gym (hydra) writes outputs/<date>/ into its working directory: keep that out of the caller's.
    run_dir = LOG_DIR / f"nemo-gym-{cfg.name}-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    run = NemoGymRun(cfg.name, None, agent_url, ports, cmd, env, run_dir, cfg.startup_timeout_s)
    run.start()
    fleet.extra_servers.append(run)
    return Env(cfg, agent_url, engine_urls=engine_urls)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_ready(run: NemoGymRun, ports: dict, timeout_s: float) -> None:
    """Every instance port accepts connections (gym env start prints its own progress into the log)."""
    deadline = time.monotonic() + timeout_s
    waiting = dict(ports)
    while waiting:
        if not run.server.alive():
            raise RuntimeError(f"gym env start exited with {run.server.process.returncode}; log {run.server.log_path}:\n"
                               f"{run.server.log_tail(4000)}")
        for name, port in list(waiting.items()):
            if _accepts(port):
                waiting.pop(name)
        if time.monotonic() > deadline:
            raise TimeoutError(f"NeMo Gym servers {sorted(waiting)} not up after {timeout_s:.0f}s; log "
                               f"{run.server.log_path}:\n{run.server.log_tail(4000)}")
        time.sleep(1)
    time.sleep(1.0)


def row_for_run(row: dict, sampling: dict) -> dict:
    """The row sent to the agent's /run, with the batch's sampling parameters in Responses API terms."""
    params = dict(row["responses_create_params"])
    # a row's explicit null must not drop the batch's value (setdefault would keep the null)
    for key, value in (("temperature", sampling.get("temperature")), ("top_p", sampling.get("top_p")),
                       ("max_output_tokens", sampling.get("max_tokens"))):
        if params.get(key) is None:
            params[key] = value
    params = {k: v for k, v in params.items() if v is not None}
    return {**{k: v for k, v in row.items() if k != "agent_ref"}, "responses_create_params": params}


def turns_from_output(output: list[dict]) -> list[tuple[list[int], list[int], list[float]]]:
    """(prompt ids, generated ids, logprobs) of each model call, from the items that carry them (NeMo
    Gym puts them on the last output item of each model response)."""
    return [(o["prompt_token_ids"], o["generation_token_ids"], o["generation_log_probs"])
            for o in output if isinstance(o, dict) and o.get("generation_token_ids") is not None]

