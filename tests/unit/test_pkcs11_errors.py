"""The PKCS#11 exception map (``_p11session.map_pkcs11_errors``), row by row, with python-pkcs11's exception classes.

That the token connection reconnects on a ``TokenLostError`` (and reports an outage after that) is proven against
SoftHSM2 in tests/component/test_pkcs11_backend.py and tests/e2e/test_pkcs11_daemon.py.
"""

from __future__ import annotations

from typing import Any

import pkcs11.exceptions as x
import pytest

from signing_agent.backends._p11session import DECRYPTION_FAILED, TokenLostError, map_pkcs11_errors
from signing_agent.errors import (
    AgentError,
    BackendError,
    BackendUnavailableError,
    KeyNotFoundError,
    PinRejectedError,
    SigningFailedError,
    UnsupportedOperationError,
)


class Session:
    """A session whose ``C_GenerateRandom`` works, or fails with ``error``."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def generate_random(self, bits: int) -> bytes:
        if self.error is not None:
            raise self.error
        return bytes(bits // 8)


def mapped(exc: Exception, **options: Any) -> AgentError:
    with pytest.raises(AgentError) as caught, map_pkcs11_errors("keys.m0", **options):
        raise exc
    assert caught.value.__cause__ is None  # no vendor exception is chained
    assert caught.value.__suppress_context__
    return caught.value


@pytest.mark.parametrize(
    "exc",
    [
        x.SessionHandleInvalid(),
        x.SessionClosed(),
        x.UserNotLoggedIn(),
        x.KeyHandleInvalid(),
        x.TokenNotPresent(),
        x.TokenNotRecognised(),
        x.DeviceRemoved(),
        x.DeviceError(),
        x.GeneralError(),
        x.PKCS11Error("CKR_CRYPTOKI_NOT_INITIALIZED: not initialized"),
    ],
    ids=type,
)
def test_a_lost_session_token_or_device_makes_the_connection_reconnect(exc: Exception) -> None:
    lost = mapped(exc)
    assert isinstance(lost, TokenLostError)
    assert isinstance(lost, BackendUnavailableError)  # should it ever reach a caller: retryable, 503
    assert lost.reason.startswith(type(exc).__name__)
    assert lost.message.startswith("keys.m0: the token failed: ")


def test_a_device_error_of_a_device_that_still_answers_was_the_request_s_own() -> None:
    refused = mapped(x.GeneralError(), session=Session(), failed=lambda e: SigningFailedError("refused"))
    assert type(refused) is SigningFailedError
    gone = mapped(x.GeneralError(), session=Session(x.DeviceRemoved()), failed=lambda e: SigningFailedError("x"))
    assert isinstance(gone, TokenLostError)
    # A lost session is lost whatever the device answers.
    assert isinstance(mapped(x.SessionHandleInvalid(), session=Session()), TokenLostError)


@pytest.mark.parametrize("exc", [x.PinIncorrect(), x.PinInvalid(), x.PinLenRange(), x.PinExpired()], ids=type)
def test_a_refused_pin_is_pin_rejected(exc: Exception) -> None:
    refused = mapped(exc)
    assert type(refused) is PinRejectedError
    assert refused.message == f"keys.m0: the token rejected the PIN ({type(exc).__name__})"
    locked = mapped(x.PinLocked())
    assert (type(locked), locked.message) == (PinRejectedError, "keys.m0: the user PIN of the token is locked")


def test_no_such_key_is_key_not_found() -> None:
    assert type(mapped(x.NoSuchKey("no key"))) is KeyNotFoundError


@pytest.mark.parametrize("exc", [x.MechanismInvalid(), x.MechanismParamInvalid(), x.FunctionNotSupported()], ids=type)
def test_what_the_token_lacks_is_unsupported(exc: Exception) -> None:
    assert type(mapped(exc)) is UnsupportedOperationError
    said = mapped(exc, unsupported=lambda e: UnsupportedOperationError(f"lacks it ({type(e).__name__})"))
    assert said.message == f"lacks it ({type(exc).__name__})"


def test_bad_arguments_are_unsupported_only_for_a_call_with_mechanism_parameters() -> None:
    assert type(mapped(x.ArgumentsBad(), mechanism_param=True)) is UnsupportedOperationError
    assert type(mapped(x.ArgumentsBad())) is BackendError


@pytest.mark.parametrize("exc", [x.EncryptedDataInvalid(), x.EncryptedDataLenRange()], ids=type)
def test_bad_encrypted_data_is_the_one_uniform_decryption_failure(exc: Exception) -> None:
    failed = mapped(exc, failed=lambda e: SigningFailedError("not this"))
    assert (type(failed), failed.message) == (BackendError, DECRYPTION_FAILED)


def test_any_other_error_is_the_operation_s_own_failure() -> None:
    generic = mapped(x.DataLenRange())
    assert (type(generic), generic.message) == (BackendError, "keys.m0: the token failed: DataLenRange")
    own = mapped(x.DataLenRange(), failed=lambda e: SigningFailedError("the token refused to sign"))
    assert type(own) is SigningFailedError


def test_errors_of_the_agent_pass_through() -> None:
    with pytest.raises(KeyNotFoundError, match="mine"), map_pkcs11_errors("keys.m0"):
        raise KeyNotFoundError("mine")
