"""Admission control on a real server with tight limits (KEYCELL_RATE_PER_IDENTITY=0.2,
KEYCELL_RATE_GLOBAL=4, one worker): 429 with Retry-After past a limit, revocations
still served while issuance is shed, and the watcher's backoff honouring Retry-After."""

from __future__ import annotations

import http.client
import json
import threading
import time
from urllib.parse import urlsplit

from keycell.client import Client, Credential, LifetimeWatcher, RateLimited, RenewalWindow, RetryPolicy


def _post(url: str, path: str, token: str, body: dict[str, object]) -> tuple[int, dict[str, str], bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port)
    conn.request("POST", "/v1/" + path, json.dumps(body), {"X-Vault-Token": token})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def test_issuance_is_shed_with_429_and_retry_after_but_revocations_are_served(
    limited_url: str, root_token: str
) -> None:
    statuses = [_post(limited_url, "auth/token/create", root_token, {"ttl": "60s"}) for _ in range(6)]
    refused = [s for s in statuses if s[0] == 429]
    assert refused, [s[0] for s in statuses]
    _, headers, body = refused[0]
    assert int(headers["retry-after"]) >= 1
    assert json.loads(body)["errors"][0].startswith("rate limit exceeded") or "shed" in body.decode()
    # Revocations are never rate limited, even for an identity over its limit.
    created = next(json.loads(s[2]) for s in statuses if s[0] == 200)
    accessor = created["auth"]["accessor"]
    for _ in range(3):
        assert _post(limited_url, "auth/token/revoke-accessor", root_token, {"accessor": accessor})[0] == 204


def test_watcher_backs_off_on_429_honouring_retry_after(limited_url: str, root_token: str) -> None:
    root = Client(limited_url, token=root_token, retry=RetryPolicy(attempts=8, base=0.2, cap=6))
    credential: Credential = root.create_token(ttl="20s", policies=["default"])
    client = Client(limited_url)
    client.use_credential(credential)
    client.lookup_self()  # spends this identity's one request per 5 s
    errors: list[tuple[float, RateLimited, float]] = []
    renewed: list[float] = []
    done = threading.Event()

    def on_error(error: object, delay: float) -> None:
        assert isinstance(error, RateLimited)
        errors.append((time.monotonic(), error, delay))

    def on_renew(_: Credential) -> None:
        renewed.append(time.monotonic())
        watcher.stop()

    watcher = LifetimeWatcher(
        client,
        credential,
        window=RenewalWindow(0.05, 0.06),
        retry=RetryPolicy(base=0.2, cap=6),
        on_error=on_error,
        on_renew=on_renew,
        on_stop=lambda r, e: done.set(),
    )
    watcher.start()
    assert done.wait(15)
    assert errors and renewed
    at, error, delay = errors[0]
    assert error.retry_after >= 1 and delay >= error.retry_after
    assert renewed[0] - at >= error.retry_after - 0.05
