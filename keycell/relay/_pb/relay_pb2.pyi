from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALIVE: _ClassVar[State]
    SUSPECT: _ClassVar[State]
    DEAD: _ClassVar[State]
ALIVE: State
SUSPECT: State
DEAD: State

class Revocation(_message.Message):
    __slots__ = ("id", "subject", "origin_cell", "revoked_at", "reason", "expires_at", "seq")
    ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_CELL_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    id: str
    subject: str
    origin_cell: str
    revoked_at: float
    reason: str
    expires_at: int
    seq: int
    def __init__(self, id: _Optional[str] = ..., subject: _Optional[str] = ..., origin_cell: _Optional[str] = ..., revoked_at: _Optional[float] = ..., reason: _Optional[str] = ..., expires_at: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class Receipt(_message.Message):
    __slots__ = ("id", "cell", "applied_at", "expires_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    cell: str
    applied_at: float
    expires_at: int
    def __init__(self, id: _Optional[str] = ..., cell: _Optional[str] = ..., applied_at: _Optional[float] = ..., expires_at: _Optional[int] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("revocation", "receipt")
    REVOCATION_FIELD_NUMBER: _ClassVar[int]
    RECEIPT_FIELD_NUMBER: _ClassVar[int]
    revocation: Revocation
    receipt: Receipt
    def __init__(self, revocation: _Optional[_Union[Revocation, _Mapping]] = ..., receipt: _Optional[_Union[Receipt, _Mapping]] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("name", "addr", "cell", "incarnation", "state")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDR_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    name: str
    addr: str
    cell: str
    incarnation: int
    state: State
    def __init__(self, name: _Optional[str] = ..., addr: _Optional[str] = ..., cell: _Optional[str] = ..., incarnation: _Optional[int] = ..., state: _Optional[_Union[State, str]] = ...) -> None: ...

class Alive(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: Member
    def __init__(self, member: _Optional[_Union[Member, _Mapping]] = ...) -> None: ...

class Suspect(_message.Message):
    __slots__ = ("name", "incarnation", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    incarnation: int
    source: str
    def __init__(self, name: _Optional[str] = ..., incarnation: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class Dead(_message.Message):
    __slots__ = ("name", "incarnation", "source")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    name: str
    incarnation: int
    source: str
    def __init__(self, name: _Optional[str] = ..., incarnation: _Optional[int] = ..., source: _Optional[str] = ...) -> None: ...

class Rumor(_message.Message):
    __slots__ = ("alive", "suspect", "dead", "entry")
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_FIELD_NUMBER: _ClassVar[int]
    DEAD_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    alive: Alive
    suspect: Suspect
    dead: Dead
    entry: Entry
    def __init__(self, alive: _Optional[_Union[Alive, _Mapping]] = ..., suspect: _Optional[_Union[Suspect, _Mapping]] = ..., dead: _Optional[_Union[Dead, _Mapping]] = ..., entry: _Optional[_Union[Entry, _Mapping]] = ...) -> None: ...

class Ping(_message.Message):
    __slots__ = ("seq", "target")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    seq: int
    target: str
    def __init__(self, seq: _Optional[int] = ..., target: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("seq", "nack")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NACK_FIELD_NUMBER: _ClassVar[int]
    seq: int
    nack: bool
    def __init__(self, seq: _Optional[int] = ..., nack: _Optional[bool] = ...) -> None: ...

class PingReq(_message.Message):
    __slots__ = ("seq", "target", "target_addr")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    TARGET_ADDR_FIELD_NUMBER: _ClassVar[int]
    seq: int
    target: str
    target_addr: str
    def __init__(self, seq: _Optional[int] = ..., target: _Optional[str] = ..., target_addr: _Optional[str] = ...) -> None: ...

class Digest(_message.Message):
    __slots__ = ("buckets", "reply")
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    buckets: _containers.RepeatedScalarFieldContainer[int]
    reply: bool
    def __init__(self, buckets: _Optional[_Iterable[int]] = ..., reply: _Optional[bool] = ...) -> None: ...

class KeyList(_message.Message):
    __slots__ = ("buckets", "keys", "reply")
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    buckets: _containers.RepeatedScalarFieldContainer[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    reply: bool
    def __init__(self, buckets: _Optional[_Iterable[int]] = ..., keys: _Optional[_Iterable[str]] = ..., reply: _Optional[bool] = ...) -> None: ...

class Sync(_message.Message):
    __slots__ = ("members", "reply")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    reply: bool
    def __init__(self, members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., reply: _Optional[bool] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("sender", "sender_addr", "sender_cell", "ping", "ack", "ping_req", "digest", "keys", "sync", "rumors", "ihave", "graft", "root", "resent")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    SENDER_ADDR_FIELD_NUMBER: _ClassVar[int]
    SENDER_CELL_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    PING_REQ_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    RUMORS_FIELD_NUMBER: _ClassVar[int]
    IHAVE_FIELD_NUMBER: _ClassVar[int]
    GRAFT_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    RESENT_FIELD_NUMBER: _ClassVar[int]
    sender: str
    sender_addr: str
    sender_cell: str
    ping: Ping
    ack: Ack
    ping_req: PingReq
    digest: Digest
    keys: KeyList
    sync: Sync
    rumors: _containers.RepeatedCompositeFieldContainer[Rumor]
    ihave: _containers.RepeatedScalarFieldContainer[str]
    graft: _containers.RepeatedScalarFieldContainer[str]
    root: str
    resent: bool
    def __init__(self, sender: _Optional[str] = ..., sender_addr: _Optional[str] = ..., sender_cell: _Optional[str] = ..., ping: _Optional[_Union[Ping, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., ping_req: _Optional[_Union[PingReq, _Mapping]] = ..., digest: _Optional[_Union[Digest, _Mapping]] = ..., keys: _Optional[_Union[KeyList, _Mapping]] = ..., sync: _Optional[_Union[Sync, _Mapping]] = ..., rumors: _Optional[_Iterable[_Union[Rumor, _Mapping]]] = ..., ihave: _Optional[_Iterable[str]] = ..., graft: _Optional[_Iterable[str]] = ..., root: _Optional[str] = ..., resent: _Optional[bool] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("replay",)
    REPLAY_FIELD_NUMBER: _ClassVar[int]
    replay: bool
    def __init__(self, replay: _Optional[bool] = ...) -> None: ...

class Applied(_message.Message):
    __slots__ = ("revocation", "relay", "applied_at")
    REVOCATION_FIELD_NUMBER: _ClassVar[int]
    RELAY_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    revocation: Revocation
    relay: str
    applied_at: float
    def __init__(self, revocation: _Optional[_Union[Revocation, _Mapping]] = ..., relay: _Optional[str] = ..., applied_at: _Optional[float] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("name", "cell", "members", "revocation_ids", "health")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_IDS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    cell: str
    members: _containers.RepeatedCompositeFieldContainer[Member]
    revocation_ids: _containers.RepeatedScalarFieldContainer[str]
    health: int
    def __init__(self, name: _Optional[str] = ..., cell: _Optional[str] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., revocation_ids: _Optional[_Iterable[str]] = ..., health: _Optional[int] = ...) -> None: ...
