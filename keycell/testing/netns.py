"""A partition harness (issue 18 §4): cells as real `keycell` processes, each cell in
its own Linux network namespace, cut and healed by taking links down and up.

The network, for harness instance k (0-63, so two runs at once do not collide):

    host namespace (the test)          hub namespace kc<k>h             cell namespace kc<k>c<i>
    kc<k>x<i> 10.213.4k+2.(4i+1)/30 -- point-to-point ---------------- ctl0 10.213.4k+2.(4i+2)/30
                                       br-api   <- kc<k>a<i> ========= api0 10.213.4k.(10+i)/24
                                       br-relay <- kc<k>r<i> ========= rel0 10.213.4k+1.(10+i)/24

Each cell runs `keycell server` (its regional API, on its api0 address, port 8200) and
`keycell relay` (its relay, on its rel0 address, port 7000, mutual TLS as every relay
off loopback must), over one dev ledger in the cell's folder. The cells reach each
other only through the hub's two bridges: `cut_relays` takes the hub ends of the relay
links down (the APIs still reach each other), `isolate` takes both of a cell's links
down. A link whose far end is down has no carrier: packets to and from it are dropped,
so a cut looks to the processes like a real partition (connections time out), while a
cell's own processes still reach each other on their own addresses.

The test process talks to every cell over a control link of its own (the host route
`10.213.4k.(10+i)/32 dev kc<k>x<i>`), which no cut touches, so a test can watch a
cut-off cell. The cells cannot reach each other through it (nothing in a cell routes
another cell's address over ctl0).

Delay, where a test needs it (the `netem` qdisc is not available), comes from
`TcpProxy`, a userspace TCP relay that adds delay to each chunk and can cut and heal.

Everything is undone on exit, even when a test fails: processes are stopped, then the
namespaces deleted (which deletes their veths and the host's routes over them). A
harness killed outright leaves its namespaces behind; the next harness that picks
the same instance number and finds its owner gone deletes them first.

Needs root and iproute2 (`ip`); NetnsError says which is missing.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from keycell.breach import Api, BreachError
from keycell.testing.processes import ServerProcess
from keycell.testing.relay_tls import TestCA

INSTANCES = 64  # harness instances that may run at once on one machine
STATE_DIR = Path("/tmp/keycell-netns")  # noqa: S108 - owner pid per instance, for stale clean-up
API_PORT = 8200
RELAY_PORT = 7000
ROOT = "kc.partition-root"  # the dev cells' shared root token, also their peer token


class NetnsError(RuntimeError):
    """The harness cannot build or change its network; the message says why."""


def ip_command() -> str:
    """The `ip` binary, or NetnsError naming the package and the privilege it needs."""
    found = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise NetnsError(
            "the partition harness needs `ip` from iproute2: apt-get install -y iproute2 "
            "(.ci/system-deps.sh installs it)"
        )
    if os.geteuid() != 0:
        raise NetnsError("the partition harness needs root: `ip netns add` creates network namespaces")
    return found


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(  # noqa: S603 - our own arguments to iproute2
        [ip_command(), *args], capture_output=True, text=True, timeout=15, check=False
    )
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class CellNet:
    """One cell's place in the network."""

    name: str  # the cell's name (us-east-1, ...)
    index: int
    netns: str
    api_ip: str
    relay_ip: str
    hub_api: str  # the hub's end of the API link: down = API cut
    hub_relay: str  # the hub's end of the relay link: down = relays cut

    @property
    def exec_prefix(self) -> list[str]:
        """Run a command inside this cell's namespace."""
        return [ip_command(), "netns", "exec", self.netns]

    @property
    def api_url(self) -> str:
        return f"http://{self.api_ip}:{API_PORT}"

    @property
    def relay_addr(self) -> str:
        return f"{self.relay_ip}:{RELAY_PORT}"


class Network:
    """The namespaces, bridges and links for `cells`; see the module docstring."""

    def __init__(self, cells: Iterable[str]) -> None:
        self.names = list(cells)
        if not 1 <= len(self.names) <= 60:
            raise ValueError("between 1 and 60 cells")
        self.instance = -1
        self.hub = ""
        self.cells: dict[str, CellNet] = {}
        self._closed = False

    # --- building ------------------------------------------------------------------------

    def _claim(self) -> int:
        """An instance number no live harness holds: `ip netns add` of its hub is the
        lock (it fails when the namespace exists)."""
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        for k in range(INSTANCES):
            hub = f"kc{k}h"
            if _ip("netns", "add", hub, check=False).returncode == 0:
                (STATE_DIR / f"kc{k}.pid").write_text(str(os.getpid()))
                return k
            owner = STATE_DIR / f"kc{k}.pid"
            try:
                pid = int(owner.read_text())
            except (OSError, ValueError):
                continue  # being set up by another harness right now, or not ours
            if not _pid_alive(pid):
                _remove_instance(k)  # left by a harness that was killed outright
                if _ip("netns", "add", hub, check=False).returncode == 0:
                    owner.write_text(str(os.getpid()))
                    return k
        raise NetnsError(f"all {INSTANCES} partition harness instances are in use")

    def create(self) -> Self:
        k = self.instance = self._claim()
        atexit.register(self.close)
        self.hub = f"kc{k}h"
        try:
            for bridge in ("br-api", "br-relay"):
                _ip("-n", self.hub, "link", "add", bridge, "type", "bridge")
                _ip("-n", self.hub, "link", "set", bridge, "up")
            for i, name in enumerate(self.names):
                self.cells[name] = self._add_cell(k, i, name)
        except BaseException:
            self.close()
            raise
        return self

    def _add_cell(self, k: int, i: int, name: str) -> CellNet:
        ns = f"kc{k}c{i}"
        cell = CellNet(
            name,
            i,
            ns,
            f"10.213.{4 * k}.{10 + i}",
            f"10.213.{4 * k + 1}.{10 + i}",
            f"kc{k}a{i}",
            f"kc{k}r{i}",
        )
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        for hub_end, inner, bridge, address in (
            (cell.hub_api, "api0", "br-api", cell.api_ip),
            (cell.hub_relay, "rel0", "br-relay", cell.relay_ip),
        ):
            _ip(
                "link",
                "add",
                "name",
                hub_end,
                "netns",
                self.hub,
                "type",
                "veth",
                "peer",
                "name",
                inner,
                "netns",
                ns,
            )
            _ip("-n", self.hub, "link", "set", hub_end, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
        # The control link: the test process (host namespace) to this cell only.
        host_end = f"kc{k}x{i}"
        _ip("link", "add", "name", host_end, "type", "veth", "peer", "name", "ctl0", "netns", ns)
        _ip("addr", "add", f"10.213.{4 * k + 2}.{4 * i + 1}/30", "dev", host_end)
        _ip("link", "set", host_end, "up")
        _ip("-n", ns, "addr", "add", f"10.213.{4 * k + 2}.{4 * i + 2}/30", "dev", "ctl0")
        _ip("-n", ns, "link", "set", "ctl0", "up")
        _ip("route", "add", f"{cell.api_ip}/32", "dev", host_end)
        return cell

    # --- cuts ------------------------------------------------------------------------------

    def _set(self, link: str, state: str) -> None:
        _ip("-n", self.hub, "link", "set", link, state)

    def cut_relays(self, cells: Iterable[str] | None = None) -> None:
        """The relay links of `cells` (default: every cell) down; the APIs stay joined."""
        for name in self.names if cells is None else cells:
            self._set(self.cells[name].hub_relay, "down")

    def isolate(self, cell: str) -> None:
        """`cell` cut off from every other cell: its API and relay links down."""
        self._set(self.cells[cell].hub_api, "down")
        self._set(self.cells[cell].hub_relay, "down")

    def heal(self) -> None:
        for cell in self.cells.values():
            self._set(cell.hub_api, "up")
            self._set(cell.hub_relay, "up")

    # --- clean-up --------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed or self.instance < 0:
            return
        self._closed = True
        _remove_instance(self.instance)
        with contextlib.suppress(OSError):
            (STATE_DIR / f"kc{self.instance}.pid").unlink()


def _remove_instance(k: int) -> None:
    """Kill what still runs in instance k's namespaces, then delete them (their veths,
    and the host's ends and routes with them)."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    mine = [line.split()[0] for line in listed if line.split() and line.split()[0].startswith(f"kc{k}")]
    mine = [ns for ns in mine if ns == f"kc{k}h" or ns.startswith(f"kc{k}c")]
    for ns in mine:
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
    for ns in mine:
        _ip("netns", "del", ns, check=False)


# --- delay: a userspace TCP proxy --------------------------------------------------------------


class TcpProxy:
    """A TCP relay from `listen` (127.0.0.1 by default, any port) to `target`, holding
    every chunk `delay` seconds before passing it on (each direction in order). `cut()`
    closes every open connection and refuses new ones until `heal()`."""

    def __init__(
        self,
        target: tuple[str, int],
        *,
        delay: float = 0.0,
        listen: str = "127.0.0.1",
        max_connections: int = 64,
    ) -> None:
        self.target = target
        self.delay = delay
        self.max_connections = max_connections
        self._server = socket.create_server((listen, 0))
        self._server.settimeout(0.2)
        self.port = int(self._server.getsockname()[1])
        self.address = (listen, self.port)
        self._cut = threading.Event()
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0  # accepted and passed on
        self.refused = 0  # closed at once: cut, or too many open
        self._thread = threading.Thread(target=self._accept, name=f"tcp-proxy-{self.port}", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._open) >= 2 * self.max_connections
            if self._cut.is_set() or full:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                self.refused += 1
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        try:
            while not self._cut.is_set():
                chunk = src.recv(65536)
                if not chunk:
                    break
                if self.delay and self._cut.wait(self.delay):
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            self._drop(src)
            self._drop(dst)

    def _drop(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            open_now = list(self._open)
        for sock in open_now:
            self._drop(sock)

    def heal(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._stop.set()
        self.cut()
        self._server.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --- the cells ---------------------------------------------------------------------------------


@dataclass
class PartitionedCells:
    """Cells as `keycell server` + `keycell relay` processes, each cell in its own
    namespace (see the module docstring). Every cell is a dev cell with the root token
    ROOT, which is also the peer token (KEYCELL_PEER_TOKEN) its direct path and
    heartbeats use against the other cells, as a deployment gives every cell a token
    the others accept on sys/revocations/apply.

        with PartitionedCells(folder, ("us-east-1", "eu-west-1", "ap-southeast-1")) as cells:
            cells.isolate("ap-southeast-1")
            cells.call("us-east-1", "POST", "sys/revocations", {...})
    """

    folder: Path
    names: tuple[str, ...]
    heartbeat_seconds: float = 0.25
    workers: int = 1
    startup_timeout: float = 90.0
    network: Network = field(init=False)
    processes: list[ServerProcess] = field(default_factory=list, init=False)
    api: Api = field(init=False)

    def __post_init__(self) -> None:
        self.network = Network(self.names)
        self.api = Api(ROOT, timeout=5.0)

    @property
    def urls(self) -> dict[str, str]:
        return {name: cell.api_url for name, cell in self.network.cells.items()}

    def start(self) -> Self:
        try:
            self.network.create()
            ca = TestCA("example.org")
            tls = self.folder / "tls"
            for cell in self.network.cells.values():
                self._start_cell(cell, ca, tls)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_cell(self, cell: CellNet, ca: TestCA, tls: Path) -> None:
        folder = self.folder / cell.name
        folder.mkdir(parents=True, exist_ok=True)
        # Certificates name 127.0.0.1 and localhost, not the namespace addresses: every
        # dialler checks the name `localhost` instead (KEYCELL_RELAY_TLS_SERVER_NAME).
        server_name = {"KEYCELL_RELAY_TLS_SERVER_NAME": "localhost"}
        api_env = {
            "KEYCELL_CELL": cell.name,
            "KEYCELL_RELAY": cell.relay_addr,
            "KEYCELL_PEER_TOKEN": ROOT,
            "KEYCELL_HEARTBEAT_S": str(self.heartbeat_seconds),
            **ca.api(tls, cell.name),
            **server_name,
        }
        api = ServerProcess(
            "keycell",
            [
                "server",
                "--listen",
                f"{cell.api_ip}:{API_PORT}",
                "--tls-disable",  # plain HTTP on the harness's private network only
                "--workers",
                str(self.workers),
                "--data-dir",
                str(folder),
                "--dev",
                "--dev-root-token",
                ROOT,
            ],
            what=f"keycell server ({cell.name})",
            env=api_env,
            startup_timeout=self.startup_timeout,
            prefix=cell.exec_prefix,
        )
        self.processes.append(api)
        api.start()
        seed = next(iter(self.network.cells.values()))
        relay_args = [
            "relay",
            "--cell",
            cell.name,
            "--dev-data-dir",
            str(folder),
            "--listen",
            cell.relay_addr,
            "--profile",
            "local",
        ]
        if seed is not cell:
            relay_args += ["--join", seed.relay_addr]
        relay = ServerProcess(
            "keycell",
            relay_args,
            what=f"keycell relay ({cell.name})",
            env={"KEYCELL_API_ADDR": cell.api_url, **ca.relay(tls, cell.name), **server_name},
            startup_timeout=self.startup_timeout,
            prefix=cell.exec_prefix,
        )
        self.processes.append(relay)
        relay.start()

    def stop(self) -> None:
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.stop()
        self.processes.clear()
        self.network.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- cuts ------------------------------------------------------------------------------

    def cut_relays(self, cells: Iterable[str] | None = None) -> None:
        self.network.cut_relays(cells)

    def isolate(self, cell: str) -> None:
        self.network.isolate(cell)

    def heal(self) -> None:
        self.network.heal()

    # --- the API ---------------------------------------------------------------------------

    def call(
        self, cell: str, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """One Vault-style call to `cell`'s API over the control link (never cut)."""
        return self.api.call(self.urls[cell], method, path, body, token)

    def freshness(self, cell: str) -> dict[str, Any]:
        """`cell`'s GET sys/revocations/freshness: per peer, watermark and staleness."""
        status, answer = self.call(cell, "GET", "sys/revocations/freshness")
        if status != 200:
            raise NetnsError(f"sys/revocations/freshness in {cell}: HTTP {status}")
        peers: dict[str, Any] = answer["data"]["peers"]
        return peers

    def fresh(self, cell: str, within: float) -> bool:
        """`cell` knows every other cell and its view of each is under `within` s stale."""
        peers = self.freshness(cell)
        return set(peers) == set(self.names) - {cell} and all(
            p["staleness_seconds"] is not None and p["staleness_seconds"] < within for p in peers.values()
        )

    def ledger_paths(self, cell: str, kind: Any) -> list[str]:
        """The paths of every `kind` item in `cell`'s ledger (its SQLite file, read
        beside the running processes): what the cell holds, not what its API says."""
        from keycell.adapters.ledgers import open_ledger
        from keycell.control_plane.ledger import iter_prefix

        ledger = open_ledger(f"sqlite://{self.folder / cell / 'cell.db'}")
        try:
            return [item.key.path for item in iter_prefix(ledger, kind, page_size=500)]
        finally:
            ledger.close()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Every cell lists every other in its directory, with its API, and is fresh."""

        def ready() -> bool:
            try:
                for cell in self.names:
                    status, answer = self.call(cell, "GET", "sys/cells")
                    listed = answer.get("data", {}).get("cells", {}) if status == 200 else {}
                    if set(listed) != set(self.names) or not all(c.get("api") for c in listed.values()):
                        return False
                return all(self.fresh(cell, 1.0) for cell in self.names)
            except (BreachError, NetnsError):
                return False

        if not wait_for(ready, timeout or self.startup_timeout, step=0.2):
            logs = "\n".join(f"--- {p.what}\n{p.log_tail(1500)}" for p in self.processes)
            raise NetnsError(f"the cells did not join up within {timeout or self.startup_timeout} s:\n{logs}")


def wait_for(condition: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """`condition()` once it is truthy, polled every `step` s for at most `timeout` s;
    its last value otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    return condition()
