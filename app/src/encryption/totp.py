"""TOTP (RFC 6238) with pyotp: 30 s steps, ±1 step of clock drift, steps reported for single use.

The caller records the accepted step and refuses any step at or below it (RFC 6238 §5.2: a
verifier MUST NOT accept the same code twice); this module only says which step a code matches.
"""

from __future__ import annotations

import hmac
import re

import pyotp

STEP_SECONDS = 30
DRIFT_STEPS = 1
DIGITS = 6
ISSUER = "Taskgate"
_CODE = re.compile(r"^\d{6}$")


def new_secret() -> str:
    """160 random bits in base32, the size RFC 4226 recommends."""
    return str(pyotp.random_base32(length=32))


def provisioning_uri(secret: str, *, account: str, issuer: str = ISSUER) -> str:
    return str(
        pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
            name=account, issuer_name=issuer
        )
    )


def step_at(timestamp: float) -> int:
    return int(timestamp // STEP_SECONDS)


def code_at_step(secret: str, step: int) -> str:
    return str(pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).generate_otp(step))


def looks_like_code(code: str) -> bool:
    return bool(_CODE.match(code))


def matching_step(secret: str, code: str, *, now: float, drift: int = DRIFT_STEPS) -> int | None:
    """The time step within ±drift of now whose code equals `code`, else None.

    Every candidate is computed and compared in constant time, so the time taken says nothing
    about which step (if any) matched.
    """
    if not looks_like_code(code):
        return None
    current = step_at(now)
    matched: int | None = None
    for step in range(current - drift, current + drift + 1):
        if hmac.compare_digest(code_at_step(secret, step).encode(), code.encode()):
            matched = step
    return matched
