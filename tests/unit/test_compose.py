"""Static checks of ``docker-compose.yml`` and ``docker/Dockerfile``.

Docker does not run where these tests run, so the file is checked the way ``docker compose config`` and a
careful reviewer would: services, images, KRaft listeners, ports, volumes, start-up order, and every
``python -m MODULE SUBCOMMAND ...`` in it parsed by that module's real argument parser (flag drift in the
CLIs breaks this test, not a user's ``docker compose up``).
"""

from __future__ import annotations

import base64
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from batch_index.cli import build_parser as batch_parser
from streaming.cli import build_parser as streaming_parser
from streaming.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
PARSERS = {"batch_index": batch_parser, "streaming": streaming_parser}
EXPECTED_SERVICES = {"kafka", "kafka-init", "spark-master", "spark-worker", "index-build", "streaming"}
APP_SERVICES = ("spark-master", "spark-worker", "index-build", "streaming")  # run the project's image
SERVE_DEFAULTS = {f.name: f.default for f in fields(ServeConfig)}

# ---- reading the file the way Compose does --------------------------------------------------------------
_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_]\w*))")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose (and POSIX shell) variable substitution: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``. A variable with neither a value nor a default is an error."""

    def sub(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name, op, arg = m["braced"] or m["bare"], m["op"], m["arg"]
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if value is None or (op == ":?" and not value):
            raise KeyError(f"${{{name}}} has no value and no default")
        return value

    return _VAR.sub(sub, text)


def _interpolated(node: Any) -> Any:
    if isinstance(node, str):
        return interpolate(node, {})  # the file must work with no .env and no exported variables
    if isinstance(node, list):
        return [_interpolated(v) for v in node]
    if isinstance(node, dict):
        return {k: _interpolated(v) for k, v in node.items()}
    return node


@pytest.fixture(scope="module")
def raw_text() -> str:
    return COMPOSE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def compose(raw_text: str) -> dict[str, Any]:
    return _interpolated(yaml.safe_load(raw_text))


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def shell_commands(script: str) -> Iterator[list[str]]:
    """The simple commands of a shell script, as argv lists (operators ; && || | and redirections split)."""
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in lexer:
            if token and set(token) <= set(";&|<>()"):
                if argv:
                    yield argv
                argv = []
            else:
                argv.append(token)
        if argv:
            yield argv


def commands_of(service: Mapping[str, Any]) -> list[list[str]]:
    """Every command the service runs: its argv, or the simple commands of its ``sh -c`` script (with the
    container's environment substituted, as the shell would)."""
    cmd = service.get("command")
    if cmd is None:
        return []
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    cmd = [str(c) for c in cmd]
    if PurePosixPath(cmd[0]).name in ("sh", "bash") and len(cmd) >= 3 and cmd[-2].startswith("-") \
            and "c" in cmd[-2]:
        return list(shell_commands(interpolate(cmd[-1], env_of(service))))
    return [cmd]


def python_modules(service: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    """``(module, argv)`` for each ``python -m module argv...`` the service runs."""
    found = []
    for argv in commands_of(service):
        for i, token in enumerate(argv[:-2]):
            if re.fullmatch(r"python3?(\.\d+)?", PurePosixPath(token).name) and argv[i + 1] == "-m":
                found.append((argv[i + 2], argv[i + 3:]))
    return found


def parse(module: str, argv: list[str], env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Parse ``argv`` with the module's own parser, built under the container's environment (the CLIs read
    their defaults from environment variables)."""
    for name in list(os.environ):
        if name.startswith(("ECG_", "KAFKA_", "SPARK_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        return PARSERS[module]().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`python -m {module} {shlex.join(argv)}` is rejected by {module}'s CLI (exit {e.code})")


def published_ports(service: Mapping[str, Any]) -> dict[int, tuple[str, int]]:
    """container port -> (host address, host port)."""
    out = {}
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out[int(p["target"])] = (str(p.get("host_ip", "")), int(p.get("published", p["target"])))
            continue
        parts = str(p).split("/")[0].split(":")
        container = int(parts[-1])
        host = int(parts[-2]) if len(parts) >= 2 else container
        out[container] = (parts[-3] if len(parts) == 3 else "", host)
    return out


def mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """container path -> source (named volume or host path)."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            out[str(v["target"])] = str(v.get("source", ""))
        else:
            source, target = str(v).split(":")[:2]
            out[target] = source
    return out


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` -> {NAME: (host, port)}."""
    out = {}
    for item in value.split(","):
        name, _, address = item.strip().partition("://")
        host, _, port = address.rpartition(":")
        out[name] = (host, int(port))
    return out


def dockerfile() -> tuple[str, dict[str, str]]:
    """The Dockerfile's base image (ARGs substituted) and its ARG defaults."""
    args: dict[str, str] = {}
    base = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "ARG" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            args.setdefault(name, value)
        elif words[0] == "FROM" and not base:
            base = interpolate(words[1], args)
    return base, args


# ---- the tests ------------------------------------------------------------------------------------------
def test_the_stack_has_every_service(services: dict[str, Any]) -> None:
    assert EXPECTED_SERVICES <= set(services), f"missing: {EXPECTED_SERVICES - set(services)}"


def test_images_are_apache_kafka_and_the_official_spark_image(services: dict[str, Any], raw_text: str) -> None:
    for name in ("kafka", "kafka-init"):
        image = services[name]["image"]
        assert re.fullmatch(r"apache/kafka:\d+\.\d+\.\d+", image), f"{name}: {image!r} is not a pinned apache/kafka"
    for name in APP_SERVICES:
        assert services[name].get("build"), f"{name} must be built from docker/Dockerfile"
    base, _ = dockerfile()
    # The Docker Official Image (library/spark), Python variant, pinned: not apache/spark, not bitnami/spark.
    assert re.fullmatch(r"(docker\.io/)?(library/)?spark:\d+\.\d+\.\d+-scala[\d.]+-java\d+-python3-ubuntu", base), base
    docker_text = DOCKERFILE.read_text(encoding="utf-8")
    assert "bitnami" not in (raw_text + docker_text).lower()


def test_pyspark_in_the_image_matches_the_images_spark(services: dict[str, Any]) -> None:
    base, args = dockerfile()
    spark_version = base.split(":")[1].split("-")[0]
    text = DOCKERFILE.read_text(encoding="utf-8")
    pins = {interpolate(m, args) for m in re.findall(r"pyspark==(\S+?)[\"'\s]", text)}
    assert pins == {spark_version}, f"pyspark pinned to {pins}, image has Spark {spark_version}"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    floor = re.search(r'"pyspark>=([\d.]+)', pyproject)
    assert floor, "pyproject.toml no longer says pyspark>=X"
    image, required = (tuple(int(x) for x in v.split(".")) for v in (spark_version, floor[1]))
    assert image >= required, f"image Spark {spark_version} < pyproject's pyspark>={floor[1]}"


def test_the_dockerfile_installs_this_project_and_its_build_context_keeps_it() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    copy = re.search(r"^COPY\s+\.\s+(\S+)", text, re.MULTILINE)
    assert copy, "the Dockerfile must COPY the repository (pyproject.toml at its root) into the image"
    assert re.search(rf"pip install .*{re.escape(copy[1])}", text), "the copied project is never pip-installed"
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    packages = re.search(r"^packages\s*=\s*\[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert packages
    needed = {"pyproject.toml", *(p.replace(".", "/") for p in re.findall(r'"([^"]+)"', packages[1]))}
    assert not needed & ignored, f".dockerignore drops what `pip install` needs: {needed & ignored}"
    for pkg in needed - {"pyproject.toml"}:
        assert (ROOT / pkg / "__init__.py").is_file(), f"pyproject lists package {pkg!r}, which is not in the repo"


def test_build_contexts_and_dockerfiles_exist(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (ROOT / build.get("context", ".")).resolve()
        assert context.is_dir(), f"{name}: build context {context} does not exist"
        assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"{name}: no {build.get('dockerfile')}"
        assert svc.get("image"), f"{name}: services sharing the built image must name it (image:)"


def test_kafka_runs_in_kraft_mode_with_a_host_listener(compose: dict[str, Any], services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    env = env_of(kafka)
    assert "zookeeper" not in yaml.safe_dump(compose).lower(), "KRaft: no ZooKeeper service or setting"
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    listen = listeners(env["KAFKA_LISTENERS"])
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listen) <= set(protocols), "every listener needs a security protocol"
    (controller,) = env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")
    assert controller in listen and controller not in advertised
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in advertised
    voter_id, _, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    host, _, port = voter.rpartition(":")
    assert voter_id == node_id and host in (kafka.get("hostname"), "kafka") and int(port) == listen[controller][1]
    for name, (_, port_) in advertised.items():
        assert listen[name][1] == port_, f"{name}: advertised port {port_} is not the port it listens on"
    # Other containers reach the broker by its service name; the host through a published port that is
    # the same number inside and out (the advertised address is used as-is by clients).
    assert ("kafka", 9092) in advertised.values()
    host_side = [(n, p) for n, (h, p) in advertised.items() if h == "localhost"]
    assert host_side, "no listener advertised for clients on the host (localhost)"
    ports = published_ports(kafka)
    for name, port_ in host_side:
        assert port_ in ports and ports[port_][1] == port_, f"{name} on {port_} is not published as {port_}:{port_}"
    cluster_id = env["CLUSTER_ID"]  # Kafka's base64 (URL-safe, unpadded) form of a 16-byte UUID
    raw = base64.urlsafe_b64decode(cluster_id + "==")
    assert len(raw) == 16 and base64.urlsafe_b64encode(raw).decode().rstrip("=") == cluster_id
    # A query is ~10 KB; the job rejects (with a reply) queries over --max-message-bytes, so the broker must
    # let those through to it.
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) > SERVE_DEFAULTS["max_message_bytes"]


def test_healthchecks_and_start_order(services: dict[str, Any]) -> None:
    for name, svc in services.items():
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for target, spec in deps.items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            if spec["condition"] == "service_healthy":
                assert services[target].get("healthcheck"), f"{name} waits for {target} to be healthy: no healthcheck"
            if spec["condition"] == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} is one-shot; it must not restart"
    streaming = services["streaming"]["depends_on"]
    assert streaming["index-build"]["condition"] == "service_completed_successfully"
    assert streaming["kafka-init"]["condition"] == "service_completed_successfully"
    assert services["kafka-init"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["index-build"]["depends_on"]["spark-master"]["condition"] == "service_healthy"
    kafka_check = " ".join(services["kafka"]["healthcheck"]["test"])
    assert "/opt/kafka/bin/" in kafka_check and ":9092" in kafka_check


def test_every_python_command_parses_with_its_modules_cli(services: dict[str, Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    seen = set()
    for name, svc in services.items():
        for module, argv in python_modules(svc):
            assert module in PARSERS and (ROOT / module / "__main__.py").is_file(), f"{name}: no module {module}"
            args = parse(module, argv, env_of(svc), monkeypatch)
            seen.add((name, module, args.command))
    assert {("index-build", "batch_index", "generate"), ("index-build", "batch_index", "build"),
            ("streaming", "streaming", "serve")} <= seen, seen


def test_the_build_uses_the_cluster_and_the_stream_reads_what_it_publishes(
        services: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    master_cmd = services["spark-master"]["command"]
    master_url = f"spark://{master_cmd[master_cmd.index('--host') + 1]}:{master_cmd[master_cmd.index('--port') + 1]}"
    assert master_url in services["spark-worker"]["command"]
    runs = {(name, module, argv[0]): (svc, argv) for name, svc in services.items()
            for module, argv in python_modules(svc)}
    build_svc, build_argv = runs["index-build", "batch_index", "build"]
    build = parse("batch_index", build_argv, env_of(build_svc), monkeypatch)
    assert build.master == master_url, "the index build must run on the cluster"
    serve_svc, serve_argv = runs["streaming", "streaming", "serve"]
    serve = parse("streaming", serve_argv, env_of(serve_svc), monkeypatch)
    assert serve.master.startswith("local"), "the streaming job runs Spark in local mode (driver-side source)"
    assert serve.bootstrap == "kafka:9092" and serve.index and serve.checkpoint
    # The build writes a version directory beside the CURRENT pointer that `serve --index` follows.
    assert str(PurePosixPath(build.output).parent) == serve.index
    assert any("CURRENT" in " ".join(argv) for argv in commands_of(build_svc)), "the build never publishes CURRENT"
    # Driver, executors and the stream all see the same volume at the same place.
    def volume_at(path: str, service: str) -> str:
        hits = [(t, s) for t, s in mounts(services[service]).items()
                if PurePosixPath(path).is_relative_to(t)]
        assert hits, f"{service}: {path} is not on a mounted volume"
        return max(hits, key=lambda h: len(h[0]))[1]

    shared = volume_at(build.output, "index-build")
    assert volume_at(build.output, "spark-worker") == shared, "executors write shards: the worker needs the volume"
    assert volume_at(build.input, "spark-worker") == shared
    assert volume_at(serve.index, "streaming") == shared and volume_at(serve.checkpoint, "streaming") == shared
    assert "/data" in DOCKERFILE.read_text() and "chown" in DOCKERFILE.read_text(), \
        "the image must create /data writable by the spark user, or a fresh volume is root-owned"


def test_topics_created_are_the_streaming_defaults(services: dict[str, Any],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    created = set()
    for argv in commands_of(services["kafka-init"]):
        if PurePosixPath(argv[0]).name == "kafka-topics.sh" and "--create" in argv:
            assert argv[0].startswith("/opt/kafka/bin/")
            assert argv[argv.index("--bootstrap-server") + 1] == "kafka:9092"
            created.add(argv[argv.index("--topic") + 1])
    defaults = {SERVE_DEFAULTS[k] for k in ("queries_topic", "replies_topic", "dead_letter_topic")}
    assert created == defaults
    ((serve_argv, serve_env),) = [(argv, env_of(svc)) for name, svc in services.items()
                                  for module, argv in python_modules(svc) if argv[:1] == ["serve"]]
    serve = parse("streaming", serve_argv, serve_env, monkeypatch)  # the CLI's defaults, as in the container
    assert {serve.queries_topic, serve.replies_topic, serve.dead_letter_topic} == created


def test_ports_for_the_host_listener_and_the_spark_uis(services: dict[str, Any]) -> None:
    assert 9094 in published_ports(services["kafka"])
    master_cmd = services["spark-master"]["command"]
    ui = int(master_cmd[master_cmd.index("--webui-port") + 1])
    assert ui in published_ports(services["spark-master"])
    hosts = {h for svc in services.values() for h, _ in published_ports(svc).values()}
    assert hosts == {"127.0.0.1"}, "ports are published on loopback by default (nothing here authenticates)"


def test_volumes_are_declared_and_used(compose: dict[str, Any], services: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = {src for svc in services.values() for src in mounts(svc).values()
            if src and not src.startswith((".", "/", "~"))}
    assert used <= declared, f"undeclared volumes: {used - declared}"
    assert declared <= used, f"declared but unused volumes: {declared - used}"
    for name in ("spark-master", "spark-worker", "index-build", "streaming"):
        assert mounts(services[name]).get("/data") == "ecg-data", f"{name} must mount the shared volume at /data"
