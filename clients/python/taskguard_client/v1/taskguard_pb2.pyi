import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GuardState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUARD_STATE_UNSPECIFIED: _ClassVar[GuardState]
    GUARD_STATE_RUNNING: _ClassVar[GuardState]
    GUARD_STATE_SUCCEEDED: _ClassVar[GuardState]
    GUARD_STATE_FAILED: _ClassVar[GuardState]
    GUARD_STATE_CANCELLED: _ClassVar[GuardState]
    GUARD_STATE_ABANDONED: _ClassVar[GuardState]
    GUARD_STATE_EXPIRED: _ClassVar[GuardState]
    GUARD_STATE_RETRY_APPROVED: _ClassVar[GuardState]

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_SUCCEEDED: _ClassVar[RunStatus]
    RUN_STATUS_FAILED: _ClassVar[RunStatus]
    RUN_STATUS_CANCELLED: _ClassVar[RunStatus]

class AcquireOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACQUIRE_OUTCOME_UNSPECIFIED: _ClassVar[AcquireOutcome]
    ACQUIRE_OUTCOME_ACQUIRED: _ClassVar[AcquireOutcome]
    ACQUIRE_OUTCOME_ALREADY_RUNNING: _ClassVar[AcquireOutcome]
    ACQUIRE_OUTCOME_RETRY_REQUIRES_APPROVAL: _ClassVar[AcquireOutcome]
    ACQUIRE_OUTCOME_LOCK_DELAYED: _ClassVar[AcquireOutcome]
    ACQUIRE_OUTCOME_QUEUED: _ClassVar[AcquireOutcome]
    ACQUIRE_OUTCOME_QUEUE_FULL: _ClassVar[AcquireOutcome]
    ACQUIRE_OUTCOME_WAIT_TIMED_OUT: _ClassVar[AcquireOutcome]
    ACQUIRE_OUTCOME_SUPERSEDED: _ClassVar[AcquireOutcome]

class OnConflict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_CONFLICT_UNSPECIFIED: _ClassVar[OnConflict]
    ON_CONFLICT_REJECT: _ClassVar[OnConflict]
    ON_CONFLICT_JOIN: _ClassVar[OnConflict]
    ON_CONFLICT_QUEUE: _ClassVar[OnConflict]
    ON_CONFLICT_KEEP_NEWEST: _ClassVar[OnConflict]
    ON_CONFLICT_SUPERSEDE: _ClassVar[OnConflict]

class FailureHandling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_HANDLING_UNSPECIFIED: _ClassVar[FailureHandling]
    FAILURE_HANDLING_REQUIRE_APPROVAL: _ClassVar[FailureHandling]
    FAILURE_HANDLING_REOPEN: _ClassVar[FailureHandling]

class HoldEvent(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOLD_EVENT_UNSPECIFIED: _ClassVar[HoldEvent]
    HOLD_EVENT_ACQUIRE_RESULT: _ClassVar[HoldEvent]
    HOLD_EVENT_HEARTBEAT_ACK: _ClassVar[HoldEvent]
    HOLD_EVENT_RELEASED: _ClassVar[HoldEvent]
    HOLD_EVENT_LOST: _ClassVar[HoldEvent]
    HOLD_EVENT_WINNER_FINISHED: _ClassVar[HoldEvent]
    HOLD_EVENT_QUEUE_POSITION: _ClassVar[HoldEvent]
    HOLD_EVENT_STOP_REQUESTED: _ClassVar[HoldEvent]

class GuardEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUARD_EVENT_TYPE_UNSPECIFIED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_SNAPSHOT: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_ACQUIRED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_DUPLICATE_REFUSED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_RETRY_REFUSED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_RENEWED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_RELEASED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_EXPIRED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_ABANDONED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_RETRY_APPROVED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_FORCE_RELEASED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_RESUMED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_LOCK_DELAY_REFUSED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_QUEUED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_DEQUEUED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_SUPERSEDED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_QUEUE_FULL_REFUSED: _ClassVar[GuardEventType]
    GUARD_EVENT_TYPE_STOP_REQUESTED: _ClassVar[GuardEventType]
GUARD_STATE_UNSPECIFIED: GuardState
GUARD_STATE_RUNNING: GuardState
GUARD_STATE_SUCCEEDED: GuardState
GUARD_STATE_FAILED: GuardState
GUARD_STATE_CANCELLED: GuardState
GUARD_STATE_ABANDONED: GuardState
GUARD_STATE_EXPIRED: GuardState
GUARD_STATE_RETRY_APPROVED: GuardState
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_SUCCEEDED: RunStatus
RUN_STATUS_FAILED: RunStatus
RUN_STATUS_CANCELLED: RunStatus
ACQUIRE_OUTCOME_UNSPECIFIED: AcquireOutcome
ACQUIRE_OUTCOME_ACQUIRED: AcquireOutcome
ACQUIRE_OUTCOME_ALREADY_RUNNING: AcquireOutcome
ACQUIRE_OUTCOME_RETRY_REQUIRES_APPROVAL: AcquireOutcome
ACQUIRE_OUTCOME_LOCK_DELAYED: AcquireOutcome
ACQUIRE_OUTCOME_QUEUED: AcquireOutcome
ACQUIRE_OUTCOME_QUEUE_FULL: AcquireOutcome
ACQUIRE_OUTCOME_WAIT_TIMED_OUT: AcquireOutcome
ACQUIRE_OUTCOME_SUPERSEDED: AcquireOutcome
ON_CONFLICT_UNSPECIFIED: OnConflict
ON_CONFLICT_REJECT: OnConflict
ON_CONFLICT_JOIN: OnConflict
ON_CONFLICT_QUEUE: OnConflict
ON_CONFLICT_KEEP_NEWEST: OnConflict
ON_CONFLICT_SUPERSEDE: OnConflict
FAILURE_HANDLING_UNSPECIFIED: FailureHandling
FAILURE_HANDLING_REQUIRE_APPROVAL: FailureHandling
FAILURE_HANDLING_REOPEN: FailureHandling
HOLD_EVENT_UNSPECIFIED: HoldEvent
HOLD_EVENT_ACQUIRE_RESULT: HoldEvent
HOLD_EVENT_HEARTBEAT_ACK: HoldEvent
HOLD_EVENT_RELEASED: HoldEvent
HOLD_EVENT_LOST: HoldEvent
HOLD_EVENT_WINNER_FINISHED: HoldEvent
HOLD_EVENT_QUEUE_POSITION: HoldEvent
HOLD_EVENT_STOP_REQUESTED: HoldEvent
GUARD_EVENT_TYPE_UNSPECIFIED: GuardEventType
GUARD_EVENT_TYPE_SNAPSHOT: GuardEventType
GUARD_EVENT_TYPE_ACQUIRED: GuardEventType
GUARD_EVENT_TYPE_DUPLICATE_REFUSED: GuardEventType
GUARD_EVENT_TYPE_RETRY_REFUSED: GuardEventType
GUARD_EVENT_TYPE_RENEWED: GuardEventType
GUARD_EVENT_TYPE_RELEASED: GuardEventType
GUARD_EVENT_TYPE_EXPIRED: GuardEventType
GUARD_EVENT_TYPE_ABANDONED: GuardEventType
GUARD_EVENT_TYPE_RETRY_APPROVED: GuardEventType
GUARD_EVENT_TYPE_FORCE_RELEASED: GuardEventType
GUARD_EVENT_TYPE_RESUMED: GuardEventType
GUARD_EVENT_TYPE_LOCK_DELAY_REFUSED: GuardEventType
GUARD_EVENT_TYPE_QUEUED: GuardEventType
GUARD_EVENT_TYPE_DEQUEUED: GuardEventType
GUARD_EVENT_TYPE_SUPERSEDED: GuardEventType
GUARD_EVENT_TYPE_QUEUE_FULL_REFUSED: GuardEventType
GUARD_EVENT_TYPE_STOP_REQUESTED: GuardEventType

class Waiter(_message.Message):
    __slots__ = ("run_id", "holder", "queued_at", "wait_until", "keep_newest", "superseding")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    QUEUED_AT_FIELD_NUMBER: _ClassVar[int]
    WAIT_UNTIL_FIELD_NUMBER: _ClassVar[int]
    KEEP_NEWEST_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDING_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    holder: str
    queued_at: _timestamp_pb2.Timestamp
    wait_until: _timestamp_pb2.Timestamp
    keep_newest: bool
    superseding: bool
    def __init__(self, run_id: _Optional[str] = ..., holder: _Optional[str] = ..., queued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., wait_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., keep_newest: _Optional[bool] = ..., superseding: _Optional[bool] = ...) -> None: ...

class Guard(_message.Message):
    __slots__ = ("task_key", "session_key", "task_name", "state", "run_id", "holder", "started_at", "expires_at", "fencing_token", "attempt", "last_status", "last_detail", "released_at", "duplicate_count", "stream_bound", "labels", "revision", "heartbeat_at", "stale", "approved_by", "approval_reason", "ttl", "released_by", "lock_delay_until", "hold_until", "policy", "waiters", "stop_requested_by", "stop_at", "holders")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    TASK_NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    LAST_STATUS_FIELD_NUMBER: _ClassVar[int]
    LAST_DETAIL_FIELD_NUMBER: _ClassVar[int]
    RELEASED_AT_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    STREAM_BOUND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_REASON_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    RELEASED_BY_FIELD_NUMBER: _ClassVar[int]
    LOCK_DELAY_UNTIL_FIELD_NUMBER: _ClassVar[int]
    HOLD_UNTIL_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WAITERS_FIELD_NUMBER: _ClassVar[int]
    STOP_REQUESTED_BY_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_FIELD_NUMBER: _ClassVar[int]
    HOLDERS_FIELD_NUMBER: _ClassVar[int]
    task_key: str
    session_key: str
    task_name: str
    state: GuardState
    run_id: str
    holder: str
    started_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    fencing_token: int
    attempt: int
    last_status: RunStatus
    last_detail: str
    released_at: _timestamp_pb2.Timestamp
    duplicate_count: int
    stream_bound: bool
    labels: _containers.ScalarMap[str, str]
    revision: int
    heartbeat_at: _timestamp_pb2.Timestamp
    stale: bool
    approved_by: str
    approval_reason: str
    ttl: _duration_pb2.Duration
    released_by: str
    lock_delay_until: _timestamp_pb2.Timestamp
    hold_until: _timestamp_pb2.Timestamp
    policy: KeyPolicy
    waiters: _containers.RepeatedCompositeFieldContainer[Waiter]
    stop_requested_by: str
    stop_at: _timestamp_pb2.Timestamp
    holders: _containers.RepeatedCompositeFieldContainer[Holder]
    def __init__(self, task_key: _Optional[str] = ..., session_key: _Optional[str] = ..., task_name: _Optional[str] = ..., state: _Optional[_Union[GuardState, str]] = ..., run_id: _Optional[str] = ..., holder: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., fencing_token: _Optional[int] = ..., attempt: _Optional[int] = ..., last_status: _Optional[_Union[RunStatus, str]] = ..., last_detail: _Optional[str] = ..., released_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., duplicate_count: _Optional[int] = ..., stream_bound: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ..., revision: _Optional[int] = ..., heartbeat_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stale: _Optional[bool] = ..., approved_by: _Optional[str] = ..., approval_reason: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., released_by: _Optional[str] = ..., lock_delay_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hold_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., policy: _Optional[_Union[KeyPolicy, _Mapping]] = ..., waiters: _Optional[_Iterable[_Union[Waiter, _Mapping]]] = ..., stop_requested_by: _Optional[str] = ..., stop_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., holders: _Optional[_Iterable[_Union[Holder, _Mapping]]] = ...) -> None: ...

class Holder(_message.Message):
    __slots__ = ("run_id", "holder", "fencing_token", "attempt", "started_at", "expires_at", "heartbeat_at", "stream_bound", "labels", "stale")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AT_FIELD_NUMBER: _ClassVar[int]
    STREAM_BOUND_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    holder: str
    fencing_token: int
    attempt: int
    started_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    heartbeat_at: _timestamp_pb2.Timestamp
    stream_bound: bool
    labels: _containers.ScalarMap[str, str]
    stale: bool
    def __init__(self, run_id: _Optional[str] = ..., holder: _Optional[str] = ..., fencing_token: _Optional[int] = ..., attempt: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., heartbeat_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stream_bound: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ..., stale: _Optional[bool] = ...) -> None: ...

class KeyPolicy(_message.Message):
    __slots__ = ("rule", "match", "on_conflict", "failure", "abandoned_requires_approval", "expired_requires_approval", "lock_delay", "max_hold", "max_queue", "max_wait", "allow_supersede", "supersede_grace", "max_holders")
    RULE_FIELD_NUMBER: _ClassVar[int]
    MATCH_FIELD_NUMBER: _ClassVar[int]
    ON_CONFLICT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    ABANDONED_REQUIRES_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_REQUIRES_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    LOCK_DELAY_FIELD_NUMBER: _ClassVar[int]
    MAX_HOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SUPERSEDE_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDE_GRACE_FIELD_NUMBER: _ClassVar[int]
    MAX_HOLDERS_FIELD_NUMBER: _ClassVar[int]
    rule: str
    match: str
    on_conflict: OnConflict
    failure: FailureHandling
    abandoned_requires_approval: bool
    expired_requires_approval: bool
    lock_delay: _duration_pb2.Duration
    max_hold: _duration_pb2.Duration
    max_queue: int
    max_wait: _duration_pb2.Duration
    allow_supersede: bool
    supersede_grace: _duration_pb2.Duration
    max_holders: int
    def __init__(self, rule: _Optional[str] = ..., match: _Optional[str] = ..., on_conflict: _Optional[_Union[OnConflict, str]] = ..., failure: _Optional[_Union[FailureHandling, str]] = ..., abandoned_requires_approval: _Optional[bool] = ..., expired_requires_approval: _Optional[bool] = ..., lock_delay: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_hold: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_queue: _Optional[int] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., allow_supersede: _Optional[bool] = ..., supersede_grace: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_holders: _Optional[int] = ...) -> None: ...

class AcquireRequest(_message.Message):
    __slots__ = ("task_key", "run_id", "holder", "ttl", "labels", "on_conflict", "retry_secret", "max_wait")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_KEY_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    HOLDER_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ON_CONFLICT_FIELD_NUMBER: _ClassVar[int]
    RETRY_SECRET_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    task_key: str
    run_id: str
    holder: str
    ttl: _duration_pb2.Duration
    labels: _containers.ScalarMap[str, str]
    on_conflict: OnConflict
    retry_secret: str
    max_wait: _duration_pb2.Duration
    def __init__(self, task_key: _Optional[str] = ..., run_id: _Optional[str] = ..., holder: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., on_conflict: _Optional[_Union[OnConflict, str]] = ..., retry_secret: _Optional[str] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AcquireResponse(_message.Message):
    __slots__ = ("outcome", "guard", "lease_id")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    outcome: AcquireOutcome
    guard: Guard
    lease_id: str
    def __init__(self, outcome: _Optional[_Union[AcquireOutcome, str]] = ..., guard: _Optional[_Union[Guard, _Mapping]] = ..., lease_id: _Optional[str] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("lease_id", "ttl")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ttl: _duration_pb2.Duration
    def __init__(self, lease_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("guard",)
    GUARD_FIELD_NUMBER: _ClassVar[int]
    guard: Guard
    def __init__(self, guard: _Optional[_Union[Guard, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id", "status", "detail")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    status: RunStatus
    detail: str
    def __init__(self, lease_id: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("guard",)
    GUARD_FIELD_NUMBER: _ClassVar[int]
    guard: Guard
    def __init__(self, guard: _Optional[_Union[Guard, _Mapping]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HoldRelease(_message.Message):
    __slots__ = ("status", "detail")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    detail: str
    def __init__(self, status: _Optional[_Union[RunStatus, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class HoldRequest(_message.Message):
    __slots__ = ("acquire", "resume", "heartbeat", "release")
    ACQUIRE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    acquire: AcquireRequest
    resume: ResumeRequest
    heartbeat: Heartbeat
    release: HoldRelease
    def __init__(self, acquire: _Optional[_Union[AcquireRequest, _Mapping]] = ..., resume: _Optional[_Union[ResumeRequest, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., release: _Optional[_Union[HoldRelease, _Mapping]] = ...) -> None: ...

class HoldResponse(_message.Message):
    __slots__ = ("outcome", "guard", "lease_id", "event", "position", "superseded_by")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_BY_FIELD_NUMBER: _ClassVar[int]
    outcome: AcquireOutcome
    guard: Guard
    lease_id: str
    event: HoldEvent
    position: int
    superseded_by: str
    def __init__(self, outcome: _Optional[_Union[AcquireOutcome, str]] = ..., guard: _Optional[_Union[Guard, _Mapping]] = ..., lease_id: _Optional[str] = ..., event: _Optional[_Union[HoldEvent, str]] = ..., position: _Optional[int] = ..., superseded_by: _Optional[str] = ...) -> None: ...

class ApproveRetryRequest(_message.Message):
    __slots__ = ("task_key", "approver", "reason")
    TASK_KEY_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_key: str
    approver: str
    reason: str
    def __init__(self, task_key: _Optional[str] = ..., approver: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ApproveRetryResponse(_message.Message):
    __slots__ = ("guard",)
    GUARD_FIELD_NUMBER: _ClassVar[int]
    guard: Guard
    def __init__(self, guard: _Optional[_Union[Guard, _Mapping]] = ...) -> None: ...

class ForceReleaseRequest(_message.Message):
    __slots__ = ("task_key", "operator", "reason")
    TASK_KEY_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    task_key: str
    operator: str
    reason: str
    def __init__(self, task_key: _Optional[str] = ..., operator: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ForceReleaseResponse(_message.Message):
    __slots__ = ("guard",)
    GUARD_FIELD_NUMBER: _ClassVar[int]
    guard: Guard
    def __init__(self, guard: _Optional[_Union[Guard, _Mapping]] = ...) -> None: ...

class GetGuardRequest(_message.Message):
    __slots__ = ("task_key",)
    TASK_KEY_FIELD_NUMBER: _ClassVar[int]
    task_key: str
    def __init__(self, task_key: _Optional[str] = ...) -> None: ...

class ListGuardsRequest(_message.Message):
    __slots__ = ("key_prefix", "states", "stale_only", "page_size", "page_token")
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    STALE_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    key_prefix: str
    states: _containers.RepeatedScalarFieldContainer[GuardState]
    stale_only: bool
    page_size: int
    page_token: str
    def __init__(self, key_prefix: _Optional[str] = ..., states: _Optional[_Iterable[_Union[GuardState, str]]] = ..., stale_only: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListGuardsResponse(_message.Message):
    __slots__ = ("guards", "next_page_token")
    GUARDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    guards: _containers.RepeatedCompositeFieldContainer[Guard]
    next_page_token: str
    def __init__(self, guards: _Optional[_Iterable[_Union[Guard, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CheckFenceRequest(_message.Message):
    __slots__ = ("task_key", "fencing_token")
    TASK_KEY_FIELD_NUMBER: _ClassVar[int]
    FENCING_TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_key: str
    fencing_token: int
    def __init__(self, task_key: _Optional[str] = ..., fencing_token: _Optional[int] = ...) -> None: ...

class CheckFenceResponse(_message.Message):
    __slots__ = ("valid", "guard")
    VALID_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    guard: Guard
    def __init__(self, valid: _Optional[bool] = ..., guard: _Optional[_Union[Guard, _Mapping]] = ...) -> None: ...

class WatchGuardsRequest(_message.Message):
    __slots__ = ("key_prefix", "start_revision", "include_snapshot")
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    START_REVISION_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    key_prefix: str
    start_revision: int
    include_snapshot: bool
    def __init__(self, key_prefix: _Optional[str] = ..., start_revision: _Optional[int] = ..., include_snapshot: _Optional[bool] = ...) -> None: ...

class GuardEvent(_message.Message):
    __slots__ = ("revision", "type", "guard", "trigger_run_id", "trigger_holder", "occurred_at", "actor", "reason", "waiter_run_id")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    GUARD_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_HOLDER_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WAITER_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    revision: int
    type: GuardEventType
    guard: Guard
    trigger_run_id: str
    trigger_holder: str
    occurred_at: _timestamp_pb2.Timestamp
    actor: str
    reason: str
    waiter_run_id: str
    def __init__(self, revision: _Optional[int] = ..., type: _Optional[_Union[GuardEventType, str]] = ..., guard: _Optional[_Union[Guard, _Mapping]] = ..., trigger_run_id: _Optional[str] = ..., trigger_holder: _Optional[str] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., waiter_run_id: _Optional[str] = ...) -> None: ...

class GuardEventBatch(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[GuardEvent]
    def __init__(self, events: _Optional[_Iterable[_Union[GuardEvent, _Mapping]]] = ...) -> None: ...
