from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Home(_message.Message):
    __slots__ = ("home", "epoch", "state", "to")
    HOME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    home: str
    epoch: int
    state: str
    to: str
    def __init__(self, home: _Optional[str] = ..., epoch: _Optional[int] = ..., state: _Optional[str] = ..., to: _Optional[str] = ...) -> None: ...

class Version(_message.Message):
    __slots__ = ("number", "envelope")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    number: int
    envelope: bytes
    def __init__(self, number: _Optional[int] = ..., envelope: _Optional[bytes] = ...) -> None: ...

class ReplicaBatch(_message.Message):
    __slots__ = ("path", "home", "meta_seq", "meta", "versions", "at", "from_cell", "found")
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOME_FIELD_NUMBER: _ClassVar[int]
    META_SEQ_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    FROM_CELL_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    path: str
    home: Home
    meta_seq: int
    meta: bytes
    versions: _containers.RepeatedCompositeFieldContainer[Version]
    at: float
    from_cell: str
    found: bool
    def __init__(self, path: _Optional[str] = ..., home: _Optional[_Union[Home, _Mapping]] = ..., meta_seq: _Optional[int] = ..., meta: _Optional[bytes] = ..., versions: _Optional[_Iterable[_Union[Version, _Mapping]]] = ..., at: _Optional[float] = ..., from_cell: _Optional[str] = ..., found: _Optional[bool] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("missing",)
    MISSING_FIELD_NUMBER: _ClassVar[int]
    missing: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, missing: _Optional[_Iterable[int]] = ...) -> None: ...

class DigestEntry(_message.Message):
    __slots__ = ("path", "epoch", "meta_seq", "generation")
    PATH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    META_SEQ_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    path: str
    epoch: int
    meta_seq: int
    generation: int
    def __init__(self, path: _Optional[str] = ..., epoch: _Optional[int] = ..., meta_seq: _Optional[int] = ..., generation: _Optional[int] = ...) -> None: ...

class HomeDigest(_message.Message):
    __slots__ = ("home", "at", "entries", "buckets")
    HOME_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    home: str
    at: float
    entries: _containers.RepeatedCompositeFieldContainer[DigestEntry]
    buckets: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, home: _Optional[str] = ..., at: _Optional[float] = ..., entries: _Optional[_Iterable[_Union[DigestEntry, _Mapping]]] = ..., buckets: _Optional[_Iterable[int]] = ...) -> None: ...

class BucketDigest(_message.Message):
    __slots__ = ("home", "at", "hashes")
    HOME_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    home: str
    at: float
    hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, home: _Optional[str] = ..., at: _Optional[float] = ..., hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class BucketReply(_message.Message):
    __slots__ = ("cell", "differing")
    CELL_FIELD_NUMBER: _ClassVar[int]
    DIFFERING_FIELD_NUMBER: _ClassVar[int]
    cell: str
    differing: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, cell: _Optional[str] = ..., differing: _Optional[_Iterable[int]] = ...) -> None: ...

class DigestReply(_message.Message):
    __slots__ = ("cell", "wanted")
    CELL_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    cell: str
    wanted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cell: _Optional[str] = ..., wanted: _Optional[_Iterable[str]] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("path", "cell", "only")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    ONLY_FIELD_NUMBER: _ClassVar[int]
    path: str
    cell: str
    only: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, path: _Optional[str] = ..., cell: _Optional[str] = ..., only: _Optional[_Iterable[int]] = ...) -> None: ...

class DirectoryState(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, entries: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("path", "home", "op", "sealed_args", "origin_cell")
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    SEALED_ARGS_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_CELL_FIELD_NUMBER: _ClassVar[int]
    path: str
    home: str
    op: str
    sealed_args: bytes
    origin_cell: str
    def __init__(self, path: _Optional[str] = ..., home: _Optional[str] = ..., op: _Optional[str] = ..., sealed_args: _Optional[bytes] = ..., origin_cell: _Optional[str] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("status", "body")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    status: int
    body: bytes
    def __init__(self, status: _Optional[int] = ..., body: _Optional[bytes] = ...) -> None: ...

class WrittenRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class WrittenReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("path", "claimer")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CLAIMER_FIELD_NUMBER: _ClassVar[int]
    path: str
    claimer: str
    def __init__(self, path: _Optional[str] = ..., claimer: _Optional[str] = ...) -> None: ...

class ClaimRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class ClaimReply(_message.Message):
    __slots__ = ("home", "votes", "cells")
    HOME_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    home: Home
    votes: int
    cells: int
    def __init__(self, home: _Optional[_Union[Home, _Mapping]] = ..., votes: _Optional[int] = ..., cells: _Optional[int] = ...) -> None: ...

class HandoverRequest(_message.Message):
    __slots__ = ("path", "to")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    path: str
    to: str
    def __init__(self, path: _Optional[str] = ..., to: _Optional[str] = ...) -> None: ...

class HandoverReply(_message.Message):
    __slots__ = ("status", "body")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    status: int
    body: bytes
    def __init__(self, status: _Optional[int] = ..., body: _Optional[bytes] = ...) -> None: ...

class AcceptRequest(_message.Message):
    __slots__ = ("batch", "epoch")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    batch: ReplicaBatch
    epoch: int
    def __init__(self, batch: _Optional[_Union[ReplicaBatch, _Mapping]] = ..., epoch: _Optional[int] = ...) -> None: ...

class RefreshRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class RefreshReply(_message.Message):
    __slots__ = ("age",)
    AGE_FIELD_NUMBER: _ClassVar[int]
    age: float
    def __init__(self, age: _Optional[float] = ...) -> None: ...
