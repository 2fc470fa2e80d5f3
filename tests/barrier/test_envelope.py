"""Envelope encryption: a data key per value, wrapped in the key backend, cached
briefly, zeroized on eviction and on seal, and wrappable for other cells."""

from __future__ import annotations

import pytest

from keycell.adapters.keys.software import SoftwareKeyBackend
from keycell.control_plane.barrier import zeroize
from keycell.control_plane.envelope import DataKeyCache, Envelope, EnvelopeError, Envelopes, Recipient
from keycell.control_plane.keys import IntegrityError, KeyBackend, KeySpec
from keycell.testing.cells import Cell

AAD = b"secret-version:secret/app/db#3"
VALUE = b"db-password: correct horse battery staple"


class CountingBackend:
    """The real software backend, counting unwraps and remembering the data keys it
    was asked to wrap (so tests can look for them in storage)."""

    def __init__(self, inner: KeyBackend) -> None:
        self.inner = inner
        self.unwraps = 0
        self.wrapped_plaintexts: list[bytes] = []

    def wrap(self, name: str, plaintext: bytes, aad: bytes) -> bytes:
        self.wrapped_plaintexts.append(bytes(plaintext))
        return self.inner.wrap(name, plaintext, aad)

    def unwrap(self, name: str, wrapped: bytes, aad: bytes) -> bytes:
        self.unwraps += 1
        return self.inner.unwrap(name, wrapped, aad)

    def __getattr__(self, attr: str) -> object:
        return getattr(self.inner, attr)


def make_envelopes(
    cell_id: str = "us-east-1", cache: DataKeyCache | None = None
) -> tuple[Envelopes, CountingBackend]:
    software = SoftwareKeyBackend()
    software.create_key("cell-kek", KeySpec.AES_256)
    backend = CountingBackend(software)
    return Envelopes(cell_id, backend, "cell-kek", cache), backend  # type: ignore[arg-type]


def test_value_round_trips_through_an_envelope() -> None:
    envelopes, _ = make_envelopes()
    envelope = envelopes.seal(VALUE, AAD)
    assert VALUE not in envelope.to_bytes()
    assert envelopes.open(Envelope.from_bytes(envelope.to_bytes()), AAD) == VALUE


def test_each_value_gets_its_own_data_key() -> None:
    envelopes, backend = make_envelopes()
    envelopes.seal(VALUE, AAD)
    envelopes.seal(VALUE, AAD)
    assert len(set(backend.wrapped_plaintexts)) == 2


def test_envelope_under_other_associated_data_fails() -> None:
    envelopes, _ = make_envelopes()
    envelope = envelopes.seal(VALUE, AAD)
    with pytest.raises(IntegrityError):
        envelopes.open(envelope, AAD + b"-other")


def test_tampered_ciphertext_fails() -> None:
    envelopes, _ = make_envelopes()
    envelope = envelopes.seal(VALUE, AAD)
    bad = bytearray(envelope.ciphertext)
    bad[-1] ^= 1
    with pytest.raises(IntegrityError):
        envelopes.open(Envelope(envelope.kek, envelope.wrapped_keys, bytes(bad)), AAD)


def test_malformed_envelope_bytes_are_refused() -> None:
    for raw in [b"", b"{}", b'{"v": 9}', b"not json"]:
        with pytest.raises(EnvelopeError):
            Envelope.from_bytes(raw)


def test_hot_reads_do_not_call_the_hsm_each_time() -> None:
    envelopes, backend = make_envelopes(cache=DataKeyCache())
    envelope = envelopes.seal(VALUE, AAD)
    envelopes.cache.clear()
    for _ in range(5):
        assert envelopes.open(envelope, AAD) == VALUE
    assert backend.unwraps == 1


def test_cache_is_bounded_and_zeroizes_what_it_evicts() -> None:
    cache = DataKeyCache(max_entries=2)
    cache.put(b"w1", bytearray(b"\x11" * 32))
    held = cache._entries[next(iter(cache._entries))][1]  # the cache's own copy
    cache.put(b"w2", b"\x22" * 32)
    cache.put(b"w3", b"\x33" * 32)
    assert len(cache) == 2 and cache.get(b"w1") is None
    assert held == bytearray(32)


def test_zeroize_overwrites_the_key_buffer_itself() -> None:
    """In place: the same buffer, its length kept (a view of it would forbid a resize),
    every byte zero, as a view of it shows."""
    key = bytearray(range(1, 33))
    view = memoryview(key)
    zeroize(key)
    assert view.tobytes() == bytes(32)
    assert key == bytearray(32) and len(key) == 32
    view.release()
    empty = bytearray()
    zeroize(empty)
    assert empty == bytearray()


def test_cache_entries_expire() -> None:
    now = [100.0]
    cache = DataKeyCache(ttl_seconds=5, clock=lambda: now[0])
    cache.put(b"w", b"\x44" * 32)
    held = next(iter(cache._entries.values()))[1]
    now[0] = 104.9
    assert cache.get(b"w") == b"\x44" * 32
    now[0] = 105.0
    assert cache.get(b"w") is None and held == bytearray(32)


def test_sealing_the_cell_empties_and_zeroizes_the_cache(cell: Cell) -> None:
    envelopes, _ = make_envelopes()
    cell.barrier.on_seal(envelopes.cache.clear)
    envelopes.seal(VALUE, AAD)
    held = next(iter(envelopes.cache._entries.values()))[1]
    cell.seal.seal()
    assert len(envelopes.cache) == 0 and held == bytearray(32)


def test_a_replica_opens_in_another_cell_without_plaintext_crossing() -> None:
    us, _ = make_envelopes("us-east-1")
    eu, eu_backend = make_envelopes("eu-west-1")
    ap, _ = make_envelopes("ap-southeast-1")
    envelope = us.seal(VALUE, AAD, recipients=(Recipient("eu-west-1", eu_backend.inner),))
    assert set(envelope.wrapped_keys) == {"us-east-1", "eu-west-1"}
    assert eu.open(envelope, AAD) == VALUE
    with pytest.raises(EnvelopeError, match="ap-southeast-1"):
        ap.open(envelope, AAD)
    with_ap = us.add_recipient(envelope, AAD, Recipient("ap-southeast-1", ap.backend.inner))  # type: ignore[attr-defined]
    assert with_ap.ciphertext == envelope.ciphertext
    assert ap.open(with_ap, AAD) == VALUE


def test_a_cell_cannot_open_another_cells_wrapped_key_with_its_own_kek() -> None:
    us, _ = make_envelopes("us-east-1")
    eu, _ = make_envelopes("eu-west-1")
    envelope = us.seal(VALUE, AAD)
    forged = Envelope(envelope.kek, {"eu-west-1": envelope.wrapped_keys["us-east-1"]}, envelope.ciphertext)
    with pytest.raises(IntegrityError):
        eu.open(forged, AAD)
