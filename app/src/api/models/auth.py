"""Who is calling, and the shapes of the auth domain: principals, stored records, DTOs."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, get_args
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

Scope = Literal[
    "tasks:read",
    "tasks:write",
    "queues:admin",
    "schedules:admin",
    "clients:admin",
    "kinds:admin",
    "tasks:work",
]
SCOPES: tuple[str, ...] = get_args(Scope)
# api_clients.max_queued_tasks is a PostgreSQL integer
MAX_QUEUED_TASKS_LIMIT = 2**31 - 1
# Active signing secrets per client: every HTTP delivery carries one signature per secret, so the
# webhook-signature header stays small; a rotation needs two (old and new), one more leaves room
# to start a second rotation before the first one's old secret is deleted.
MAX_SIGNING_SECRETS = 3


@dataclass(frozen=True, slots=True)
class Principal:
    """An API client (machine) or an operator session; `client_id` is the tenant.

    An operator acts as its own tenant: `client_id == operator_id`, with every scope.
    """

    kind: Literal["client", "operator"]
    client_id: UUID
    scopes: frozenset[str]
    operator_id: UUID | None = None
    key_id: UUID | None = None
    max_queued_tasks: int | None = None
    session_id: UUID | None = None
    rate_limit_per_s: float | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def allows(self, *scopes: str) -> bool:
        return all(scope in self.scopes for scope in scopes)

    @property
    def is_operator(self) -> bool:
        return self.kind == "operator"


# Stored records (what the repository returns). Fields holding ciphertexts or digests never leave
# the auth services.


@dataclass(frozen=True, slots=True)
class User:
    id: UUID
    email: str
    password_hash: str
    totp_secret: str  # ciphertext
    totp_pending_secret: str | None  # ciphertext, during re-enrolment
    totp_last_step: int
    disabled: bool
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiClient:
    id: UUID
    name: str
    scopes: list[str]
    disabled: bool
    max_queued_tasks: int | None
    rate_limit_per_s: float
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    id: UUID
    client_id: UUID
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class KeyCredential:
    """An active key joined with its client: everything the authenticator needs in one row."""

    key_id: UUID
    key_hash: bytes
    client_id: UUID
    scopes: list[str]
    client_disabled: bool
    max_queued_tasks: int | None
    rate_limit_per_s: float


@dataclass(frozen=True, slots=True)
class SessionCredential:
    session_id: UUID
    token_hash: bytes
    user_id: UUID


@dataclass(frozen=True, slots=True)
class MfaChallenge:
    token_hash: bytes
    user_id: UUID
    expires_at: datetime
    failures: int


@dataclass(frozen=True, slots=True)
class SigningSecretRecord:
    id: UUID
    client_id: UUID
    secret: str  # ciphertext
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Throttle:
    failures: int
    blocked_until: datetime | None


# What the services hand out.


@dataclass(frozen=True, slots=True)
class SigningSecret:
    id: UUID
    secret: str  # whsec_...
    created_at: datetime


@dataclass(frozen=True, slots=True)
class IssuedKey:
    client_id: UUID
    key_id: UUID
    api_key: str


@dataclass(frozen=True, slots=True)
class SessionGrant:
    access_token: str
    expires_at: datetime
    session_id: UUID


@dataclass(frozen=True, slots=True)
class MfaGrant:
    mfa_token: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class NewOperator:
    user_id: UUID
    email: str
    totp_secret: str
    totp_uri: str


@dataclass(frozen=True, slots=True)
class TotpEnrollment:
    secret: str
    provisioning_uri: str


# HTTP DTOs.


class LoginIn(BaseModel):
    email: str = Field(min_length=3, max_length=254)
    password: str = Field(min_length=1, max_length=1024)


class LoginOut(BaseModel):
    """Every operator has TOTP on, so a correct password always asks for the second factor."""

    mfa_required: bool = True
    mfa_token: str = Field(description="short-lived; send it with the code to /api/auth/login/totp")


class TotpLoginIn(BaseModel):
    mfa_token: str = Field(min_length=1, max_length=200)
    code: str = Field(min_length=1, max_length=64, description="a 6-digit TOTP code or a recovery code")


class SessionOut(BaseModel):
    access_token: str
    expires_at: datetime


class LoggedOut(BaseModel):
    session_id: UUID
    revoked: bool = True


class MeOut(BaseModel):
    kind: Literal["client", "operator"]
    client_id: UUID
    scopes: list[str]
    operator_id: UUID | None = None
    email: str | None = None
    key_id: UUID | None = None
    max_queued_tasks: int | None = None


class TotpEnrollOut(BaseModel):
    secret: str
    provisioning_uri: str


class TotpConfirmIn(BaseModel):
    code: str = Field(min_length=6, max_length=6, pattern=r"^\d{6}$")


class RecoveryCodesOut(BaseModel):
    recovery_codes: list[str]


class ClientIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    scopes: list[Scope] = Field(min_length=1)
    max_queued_tasks: int | None = Field(default=None, gt=0, le=MAX_QUEUED_TASKS_LIMIT)
    rate_limit_per_s: float | None = Field(default=None, gt=0, le=1_000_000)


class ClientCreatedOut(BaseModel):
    client_id: UUID
    key_id: UUID
    api_key: str = Field(description="shown once; only its hash is stored")


class ClientOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    name: str
    scopes: list[str]
    disabled: bool
    max_queued_tasks: int | None
    rate_limit_per_s: float
    created_at: datetime


class ClientList(BaseModel):
    items: list[ClientOut]
    next_cursor: str | None = None


class KeyCreatedOut(BaseModel):
    key_id: UUID
    api_key: str = Field(description="shown once; only its hash is stored")


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class KeyList(BaseModel):
    items: list[KeyOut]
    next_cursor: str | None = None


class SigningSecretOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: UUID
    secret: str
    created_at: datetime


class SigningSecretList(BaseModel):
    """Newest first; every listed secret signs deliveries until it is deleted."""

    items: list[SigningSecretOut]
