"""Event normalisers, one per cloud event shape (the core's `EventNormaliser`,
control_plane/events.py). `NORMALISERS` is every one of them; tests/rotation/
test_event_conformance.py is their one conformance suite."""

from __future__ import annotations

from keycell.adapters.events.azure_eventgrid import AzureEventGrid
from keycell.adapters.events.cloudevents import CloudEvents
from keycell.adapters.events.eventbridge import EventBridgeSchedule
from keycell.adapters.events.gcp_pubsub import GcpPubSub
from keycell.adapters.events.secretsmanager import SecretsManagerRotation
from keycell.control_plane.events import EventNormaliser

NORMALISERS: tuple[EventNormaliser, ...] = (
    SecretsManagerRotation(),
    EventBridgeSchedule(),
    AzureEventGrid(),
    GcpPubSub(),
    CloudEvents(),
)
