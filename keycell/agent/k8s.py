"""Kubernetes workload attestation: which pod and container a calling process runs in.

The pod UID and container ID come from the caller's cgroup path (/proc/PID/cgroup,
where the kubelet's cgroup driver puts `.../pod<UID>/<container ID>` or the systemd
form `...-pod<UID>.slice/cri-containerd-<ID>.scope`). The pod itself (namespace,
service account, labels, images and their digests) comes from the kubelet's `/pods`
endpoint, which lists the pods on this node. Selectors, in SPIRE's vocabulary:
`k8s:ns:`, `k8s:sa:`, `k8s:pod-name:`, `k8s:pod-uid:`, `k8s:node-name:`,
`k8s:pod-label:KEY:VALUE`, `k8s:container-name:`, `k8s:container-image:` (as
written in the pod spec) and `k8s:pod-image:` (the image ID the kubelet reports,
with its digest). A process that is not in a pod gets no k8s selectors.
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.request
from typing import Any

from keycell.agent.workload import AttestationError

_POD_UID = re.compile(r"pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12})")
_CONTAINER_ID = re.compile(r"(?:^|[-/])([0-9a-f]{64})(?:\.scope)?$")


def pod_and_container(pid: int) -> tuple[str, str] | None:
    """(pod UID, container ID) from the process's cgroups, or None outside a pod."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        raise AttestationError("the calling process exited during attestation") from None
    for line in lines:
        path = line.split(":", 2)[-1]
        pod = _POD_UID.search(path)
        container = _CONTAINER_ID.search(path)
        if pod and container:
            return pod.group(1).replace("_", "-"), container.group(1)
    return None


class K8sAttestor:
    def __init__(self, kubelet_url: str, *, token: str | None = None, ca_file: str | None = None) -> None:
        self.url = kubelet_url.rstrip("/") + "/pods"
        self.token = token
        self.context = ssl.create_default_context(cafile=ca_file) if kubelet_url.startswith("https") else None

    def _pods(self) -> list[dict[str, Any]]:
        request = urllib.request.Request(self.url)  # noqa: S310 - the operator's kubelet URL
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=5, context=self.context) as reply:  # noqa: S310
                body = json.loads(reply.read())
        except (OSError, ValueError) as exc:
            raise AttestationError(
                f"the kubelet could not be asked about pods ({type(exc).__name__})"
            ) from None
        items = body.get("items") if isinstance(body, dict) else None
        if not isinstance(items, list):
            raise AttestationError("the kubelet's /pods answer is not a pod list")
        return items

    def attest(self, pid: int) -> list[str]:
        found = pod_and_container(pid)
        if found is None:
            return []
        pod_uid, container_id = found
        for pod in self._pods():
            meta = pod.get("metadata") or {}
            if meta.get("uid") != pod_uid:
                continue
            status = pod.get("status") or {}
            for container in (status.get("containerStatuses") or []) + (
                status.get("initContainerStatuses") or []
            ):
                if str(container.get("containerID", "")).rsplit("/", 1)[-1] != container_id:
                    continue
                spec = pod.get("spec") or {}
                selectors = [
                    f"k8s:ns:{meta.get('namespace', '')}",
                    f"k8s:sa:{spec.get('serviceAccountName', 'default')}",
                    f"k8s:pod-name:{meta.get('name', '')}",
                    f"k8s:pod-uid:{pod_uid}",
                    f"k8s:node-name:{spec.get('nodeName', '')}",
                    f"k8s:container-name:{container.get('name', '')}",
                    f"k8s:container-image:{container.get('image', '')}",
                    f"k8s:pod-image:{container.get('imageID', '')}",
                ]
                selectors += [f"k8s:pod-label:{k}:{v}" for k, v in sorted((meta.get("labels") or {}).items())]
                return [s for s in selectors if not s.endswith(":")]
            raise AttestationError("the caller's container is not (yet) in the kubelet's pod status")
        raise AttestationError("the caller's pod is not known to this node's kubelet")
