"""The client against a real `keycell server --dev`: sync and async operations, the
lifetime watcher (renewal inside the window, stop on revocation), the wrapping cache,
and the revocation stream."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from keycell.client import (
    AsyncClient,
    AsyncLifetimeWatcher,
    Client,
    Credential,
    CredentialRevoked,
    LifetimeWatcher,
    NotFound,
    PermissionDenied,
    RenewalWindow,
    RevocationSubscription,
    WrappedSecretCache,
    wrapping_key,
)
from keycell.client.cache import UnsafeCacheFile
from keycell.client.watcher import REVOKED
from keycell.testing.clock import ManualClock


def test_sync_and_async_clients_share_one_model(root: Client, cell_url: str) -> None:
    root.kv_write("client/app", {"password": "s3cret"})
    assert root.kv_read("client/app")["data"] == {"password": "s3cret"}
    with pytest.raises(NotFound):
        root.kv_read("client/missing")
    root.request("POST", "transit/keys/client-key")
    ciphertext = root.encrypt("client-key", b"hello")

    async def use() -> tuple[dict[str, object], bytes]:
        client = AsyncClient(cell_url, token=root.token)
        return await client.kv_read("client/app"), await client.decrypt("client-key", ciphertext)

    read, plain = asyncio.run(use())
    assert read["data"] == {"password": "s3cret"} and plain == b"hello"
    with pytest.raises(PermissionDenied) as denied:
        Client(cell_url, token="kc.not-a-token").kv_read("client/app")
    assert "log in again" in str(denied.value)


def test_watcher_renews_inside_the_window(root: Client, cell_url: str) -> None:
    credential: Credential = root.create_token(ttl="4s", policies=["default"])
    client = Client(cell_url)
    client.use_credential(credential)
    renewed_at: list[float] = []
    done = threading.Event()

    def on_renew(renewed: Credential) -> None:
        renewed_at.append(time.time())
        if len(renewed_at) == 2:
            watcher.stop()

    stopped: list[tuple[str, object]] = []

    def on_stop(reason: str, error: object) -> None:
        stopped.append((reason, error))
        done.set()

    watcher = LifetimeWatcher(
        client, credential, window=RenewalWindow(0.5, 0.8), on_renew=on_renew, on_stop=on_stop
    )
    watcher.start()
    assert done.wait(10)
    assert len(renewed_at) == 2, f"stopped after {len(renewed_at)} renewals: {stopped}"
    first = renewed_at[0] - credential.obtained_at
    assert 4 * 0.5 - 0.05 <= first <= 4 * 0.8 + 0.5
    assert watcher.credential.ttl > 0 and watcher.stop_reason == "stopped"


def test_watcher_stops_when_the_token_is_revoked(root: Client, cell_url: str) -> None:
    credential: Credential = root.create_token(ttl="2s", policies=["default"])
    client = Client(cell_url)
    client.use_credential(credential)
    root.request("POST", "auth/token/revoke-accessor", {"accessor": credential.accessor})
    stopped: list[tuple[str, object]] = []
    done = threading.Event()

    def on_stop(reason: str, error: object) -> None:
        stopped.append((reason, error))
        done.set()

    watcher = LifetimeWatcher(client, credential, window=RenewalWindow(0.1, 0.2), on_stop=on_stop).start()
    assert done.wait(5)
    assert stopped[0][0] == REVOKED and isinstance(stopped[0][1], PermissionDenied)
    assert watcher.renewals == 0


def test_async_watcher_renews_and_stops_on_revocation(root: Client, cell_url: str) -> None:
    credential: Credential = root.create_token(ttl="2s", policies=["default"])

    async def scenario() -> tuple[int, str | None]:
        client = AsyncClient(cell_url)
        client.use_credential(credential)
        renewals: list[Credential] = []

        def on_renew(renewed: Credential) -> None:
            renewals.append(renewed)
            root.request("POST", "auth/token/revoke-accessor", {"accessor": credential.accessor})

        watcher = AsyncLifetimeWatcher(client, credential, window=RenewalWindow(0.2, 0.3), on_renew=on_renew)
        watcher.start()
        await asyncio.wait_for(watcher.wait(), 8)
        return len(renewals), watcher.stop_reason

    assert asyncio.run(scenario()) == (1, REVOKED)


def test_wrapping_cache_unwraps_once_and_survives_a_restart(
    root: Client, cell_url: str, tmp_path: Path
) -> None:
    info = root.create_token(ttl="60s", policies=["default"], wrap_ttl="60s")
    path = tmp_path / "cache" / "tokens.json"
    client = Client(cell_url)
    cache = WrappedSecretCache(path)
    first = cache.unwrap(client, info["token"])
    assert cache.unwraps == 1 and first["auth"]["client_token"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    sent = client.requests_sent
    assert cache.unwrap(client, info["token"]) == first
    assert client.requests_sent == sent  # no second unwrap (it would fail: unwrap is once only)

    # A restarted process: new client, new cache instance, same file.
    again = WrappedSecretCache(path)
    restarted = Client(cell_url)
    assert again.unwrap(restarted, info["token"]) == first
    assert again.unwraps == 0 and restarted.requests_sent == 0
    cached = again.credential(wrapping_key(info["token"]))
    assert cached is not None
    restarted.use_credential(cached)
    assert restarted.lookup_self()["accessor"] == first["auth"]["accessor"]


def test_wrapping_cache_expiry_memory_mode_and_unsafe_file(tmp_path: Path) -> None:
    clock = ManualClock(1000.0)
    cache = WrappedSecretCache(None, margin=5, clock=clock)
    cache.put("k", {"data": {"a": 1}}, expires_at=1100.0)
    assert cache.get("k") == {"data": {"a": 1}}
    clock.advance(96)  # inside the margin
    assert cache.get("k") is None
    path = tmp_path / "open.json"
    path.write_text("{}")
    path.chmod(0o644)
    with pytest.raises(UnsafeCacheFile):
        WrappedSecretCache(path).get("k")


def test_revocation_stream_drops_the_credential(root: Client, cell_url: str) -> None:
    credential: Credential = root.create_token(ttl="60s", policies=["default"])
    client = Client(cell_url)
    client.use_credential(credential)
    watcher = LifetimeWatcher(client, credential)
    heard = threading.Event()
    subscription = RevocationSubscription(client, watchers=[watcher], on_revoked=lambda s, r: heard.set())
    subscription.start()
    try:
        assert subscription.ready.wait(5)
        watcher.start()
        other: Credential = root.create_token(ttl="60s", policies=["default"])
        root.request("POST", "auth/token/revoke-accessor", {"accessor": other.accessor})
        time.sleep(0.3)
        assert client.token == credential.id  # someone else's revocation is not shown to this token
        revoked_at = time.monotonic()
        root.request("POST", "auth/token/revoke-accessor", {"accessor": credential.accessor})
        assert heard.wait(3)
        assert time.monotonic() - revoked_at < 1.0
        assert client.token is None and client.credential is None
        assert subscription.heard == [f"token:{credential.accessor}"]
        with pytest.raises(CredentialRevoked):
            client.kv_read("client/app")
        watcher.join(2)
        assert watcher.stop_reason == REVOKED
    finally:
        subscription.stop()
        subscription.join(2)
