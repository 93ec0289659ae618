from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from caplab import errors, validation


@pytest.mark.parametrize(
    "key, fragment",
    [
        ("", "must not be empty"),
        ("a\x00b", "NUL"),
        ("k" * 1025, "1025 bytes"),
        ("é" * 513, "1026 bytes"),
        ("\ud800", "UTF-8"),
    ],
)
def test_bad_keys_are_refused_with_a_clear_reason(key: str, fragment: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=fragment):
        validation.check_key(key)


def test_key_limits_are_inclusive() -> None:
    assert validation.check_key("k" * 1024) == "k" * 1024
    assert validation.check_key("x") == "x"


def test_value_limit() -> None:
    assert validation.check_value(b"v" * validation.MAX_VALUE_BYTES)
    with pytest.raises(errors.InvalidArgument, match="1 MiB"):
        validation.check_value(b"v" * (validation.MAX_VALUE_BYTES + 1))


@given(
    st.integers(min_value=validation.INT64_MIN, max_value=validation.INT64_MAX),
    st.integers(min_value=validation.INT64_MIN, max_value=validation.INT64_MAX),
)
def test_counter_overflow_is_out_of_range(current: int, delta: int) -> None:
    exact = current + delta
    if validation.INT64_MIN <= exact <= validation.INT64_MAX:
        assert validation.check_counter_result(current, delta, "c") == exact
    else:
        with pytest.raises(errors.OutOfRange, match="overflow"):
            validation.check_counter_result(current, delta, "c")


def test_request_ids() -> None:
    assert validation.check_request_id("", 0) is None
    assert validation.check_request_id("c", 3) == validation.RequestId("c", 3)
    with pytest.raises(errors.InvalidArgument, match="sequence must be >= 1"):
        validation.check_request_id("c", 0)
    with pytest.raises(errors.InvalidArgument, match="client_id is empty"):
        validation.check_request_id("", 5)
    with pytest.raises(errors.InvalidArgument, match="128 bytes"):
        validation.check_request_id("c" * 129, 1)


def test_skew_bounds() -> None:
    assert validation.check_skew(-5000) == -5000
    with pytest.raises(errors.InvalidArgument):
        validation.check_skew(validation.MAX_CLOCK_SKEW_MS + 1)


@pytest.mark.parametrize(
    "code, details, trailers, cls, definite",
    [
        (
            grpc.StatusCode.UNAVAILABLE,
            "no leader",
            [("caplab-outcome", "not-applied")],
            errors.Unavailable,
            True,
        ),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", [], errors.OutcomeUnknown, False),
        (
            grpc.StatusCode.UNAVAILABLE,
            "failed to connect to all addresses",
            [],
            errors.TransportError,
            True,
        ),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", [], errors.OutcomeUnknown, False),
        (
            grpc.StatusCode.UNKNOWN,
            "lost leadership",
            [("caplab-outcome", "unknown")],
            errors.OutcomeUnknown,
            False,
        ),
        (grpc.StatusCode.INTERNAL, "boom", [], errors.OutcomeUnknown, False),
        (grpc.StatusCode.CANCELLED, "cancelled", [], errors.OutcomeUnknown, False),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad key", [], errors.InvalidArgument, True),
        (grpc.StatusCode.FAILED_PRECONDITION, "AP", [], errors.FailedPrecondition, True),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", [], errors.Overloaded, True),
        (grpc.StatusCode.OUT_OF_RANGE, "overflow", [], errors.OutOfRange, True),
        (grpc.StatusCode.UNIMPLEMENTED, "no admin", [], errors.StoreError, True),
    ],
)
def test_error_model_classification(
    code: grpc.StatusCode,
    details: str,
    trailers: list[tuple[str, str]],
    cls: type[errors.StoreError],
    definite: bool,
) -> None:
    err = errors.classify(code, details, trailers)
    assert type(err) is cls
    assert err.definite is definite
    assert err.code == code
    assert err.message == details
