"""Kubernetes workload attestation of a real process placed in a kubelet-style cgroup
(`kubepods/burstable/pod<UID>/<container ID>`), with the pod read from a kubelet-shaped
`/pods` endpoint served on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from keycell.agent.k8s import K8sAttestor, pod_and_container
from keycell.agent.workload import AttestationError


def cgroup_root() -> Path:
    """A writable cgroup hierarchy: cgroup2 where mounted, else the v1 pids controller."""
    with open("/proc/mounts") as f:
        mounts = [line.split() for line in f]
    for _, point, kind, *_ in mounts:
        if kind == "cgroup2":
            return Path(point)
    for _, point, kind, options, *_ in mounts:
        if kind == "cgroup" and "pids" in options.split(","):
            return Path(point)
    raise AssertionError("no cgroup hierarchy is mounted: the k8s attestor reads the caller's cgroup")


@pytest.fixture
def pod_process() -> Iterator[tuple[int, str, str]]:
    """A process running in a pod's container cgroup: (pid, pod uid, container id)."""
    pod_uid, container_id = str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex
    base = cgroup_root() / f"kubepods-test-{os.getpid()}"
    folder = base / "burstable" / f"pod{pod_uid}" / container_id
    folder.mkdir(parents=True)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / "cgroup.procs").write_text(str(child.pid))
        yield child.pid, pod_uid, container_id
    finally:
        child.kill()
        child.wait()
        for path in (folder, folder.parent, folder.parent.parent, base):
            path.rmdir()


def pod_list(pod_uid: str, container_id: str) -> dict:
    return {
        "kind": "PodList",
        "items": [
            {
                "metadata": {"name": "other", "namespace": "x", "uid": str(uuid.uuid4())},
                "spec": {},
                "status": {},
            },
            {
                "metadata": {
                    "name": "payments-7f9c",
                    "namespace": "payments",
                    "uid": pod_uid,
                    "labels": {"app": "payments", "tier": "backend"},
                },
                "spec": {"serviceAccountName": "payments-sa", "nodeName": "node-a"},
                "status": {
                    "containerStatuses": [
                        {
                            "name": "api",
                            "image": "registry.example/payments:1.4",
                            "imageID": "registry.example/payments@sha256:" + "ab" * 32,
                            "containerID": f"containerd://{container_id}",
                        }
                    ]
                },
            },
        ],
    }


@pytest.fixture
def kubelet() -> Iterator[tuple[str, dict]]:
    """A kubelet-shaped endpoint: GET /pods answers the pod list the test sets."""
    state: dict = {"pods": {"items": []}}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(state["pods"]).encode() if self.path == "/pods" else b"{}"
            self.send_response(200 if self.path == "/pods" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def test_a_process_in_a_pod_gets_its_pods_selectors(
    pod_process: tuple[int, str, str], kubelet: tuple[str, dict]
) -> None:
    pid, pod_uid, container_id = pod_process
    url, state = kubelet
    state["pods"] = pod_list(pod_uid, container_id)
    assert pod_and_container(pid) == (pod_uid, container_id)
    selectors = set(K8sAttestor(url).attest(pid))
    assert {
        "k8s:ns:payments",
        "k8s:sa:payments-sa",
        "k8s:pod-name:payments-7f9c",
        f"k8s:pod-uid:{pod_uid}",
        "k8s:node-name:node-a",
        "k8s:container-name:api",
        "k8s:container-image:registry.example/payments:1.4",
        "k8s:pod-image:registry.example/payments@sha256:" + "ab" * 32,
        "k8s:pod-label:app:payments",
        "k8s:pod-label:tier:backend",
    } == selectors


def test_a_pod_the_kubelet_does_not_list_is_refused(
    pod_process: tuple[int, str, str], kubelet: tuple[str, dict]
) -> None:
    pid, _, _ = pod_process
    url, state = kubelet
    state["pods"] = pod_list(str(uuid.uuid4()), "0" * 64)
    with pytest.raises(AttestationError, match="not known to this node's kubelet"):
        K8sAttestor(url).attest(pid)


def test_a_process_outside_any_pod_has_no_k8s_selectors(kubelet: tuple[str, dict]) -> None:
    url, _ = kubelet
    assert K8sAttestor(url).attest(os.getpid()) == []
