"""Input limits of the contract, enforced on every entry point (see kv.proto, LIMITS)."""

from __future__ import annotations

from dataclasses import dataclass

from caplab.errors import InvalidArgument, OutOfRange

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1024 * 1024
MAX_CLIENT_ID_BYTES = 128
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_CLOCK_SKEW_MS = 24 * 3600 * 1000
# Everything a single request may carry, with room for protobuf framing; the
# gRPC server and clients are configured with it so that oversized messages are
# refused by gRPC itself before they are parsed.
MAX_MESSAGE_BYTES = 2 * MAX_VALUE_BYTES + 64 * 1024


@dataclass(frozen=True, slots=True)
class RequestId:
    """Exactly-once identity of a mutation (Raft thesis §6.3)."""

    client_id: str  # non-empty, <= MAX_CLIENT_ID_BYTES of UTF-8
    sequence: int  # >= 1, strictly increasing per client_id


def check_key(key: str) -> str:
    if not key:
        raise InvalidArgument("key must not be empty (1..1024 bytes of UTF-8)")
    if "\x00" in key:
        raise InvalidArgument("key must not contain the NUL character")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument("key must be valid UTF-8 (it contains a lone surrogate)") from None
    if size > MAX_KEY_BYTES:
        raise InvalidArgument(f"key is {size} bytes; the limit is {MAX_KEY_BYTES} bytes of UTF-8")
    return key


def check_value(value: bytes, what: str = "value") -> bytes:
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidArgument(
            f"{what} is {len(value)} bytes; the limit is {MAX_VALUE_BYTES} bytes (1 MiB)"
        )
    return value


def check_delta(delta: int) -> int:
    if not INT64_MIN <= delta <= INT64_MAX:
        raise InvalidArgument("delta must be a signed 64-bit integer")
    return delta


def check_counter_result(current: int, delta: int, key: str) -> int:
    """The counter after adding delta, or OutOfRange if it leaves int64."""
    result = current + delta
    if not INT64_MIN <= result <= INT64_MAX:
        raise OutOfRange(
            f"incrementing counter {key!r} (now {current}) by {delta} would overflow a signed "
            "64-bit integer; nothing was applied"
        )
    return result


def check_request_id(client_id: str, sequence: int) -> RequestId | None:
    """None when the client opted out of exactly-once (empty client_id)."""
    if not client_id:
        if sequence:
            raise InvalidArgument("request_id.sequence is set but request_id.client_id is empty")
        return None
    if len(client_id.encode("utf-8", "surrogatepass")) > MAX_CLIENT_ID_BYTES:
        raise InvalidArgument(f"request_id.client_id is longer than {MAX_CLIENT_ID_BYTES} bytes")
    if sequence < 1:
        raise InvalidArgument("request_id.sequence must be >= 1 when client_id is set")
    return RequestId(client_id, sequence)


def check_skew(skew_ms: int) -> int:
    if abs(skew_ms) > MAX_CLOCK_SKEW_MS:
        raise InvalidArgument(f"skew_ms must be within +-{MAX_CLOCK_SKEW_MS} ms (one day)")
    return skew_ms
