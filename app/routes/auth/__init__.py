"""/api/auth: operator login (password, then TOTP), sessions, TOTP re-enrolment, API clients."""

from __future__ import annotations

from uuid import UUID

from quart import Blueprint, request
from quart_schema import validate_querystring, validate_request, validate_response

from app.middlewares import public, requires_operator, requires_scopes
from app.routes.context import db
from app.routes.context import principal as current_principal
from app.src.api.auth import clients, operators
from app.src.api.models.auth import (
    ClientCreatedOut,
    ClientIn,
    ClientList,
    ClientOut,
    KeyCreatedOut,
    KeyList,
    KeyOut,
    LoggedOut,
    LoginIn,
    LoginOut,
    MeOut,
    RecoveryCodesOut,
    SessionOut,
    SigningSecret,
    SigningSecretList,
    SigningSecretOut,
    TotpConfirmIn,
    TotpEnrollOut,
    TotpLoginIn,
)
from app.src.api.models.common import ListQuery, PageQuery

blueprint = Blueprint("auth", __name__)


def _address() -> str:
    return request.remote_addr or "unknown"


def _secrets(items: list[SigningSecret]) -> SigningSecretList:
    return SigningSecretList(items=[SigningSecretOut.model_validate(item) for item in items])


@blueprint.post("/login")
@public
@validate_request(LoginIn)
@validate_response(LoginOut, 200)
async def login(data: LoginIn) -> LoginOut:
    """Log in with email and password; answers with an MFA token for the TOTP step."""
    grant = await operators.login(db(), email=data.email, password=data.password, address=_address())
    return LoginOut(mfa_required=True, mfa_token=grant.mfa_token)


@blueprint.post("/login/totp")
@public
@validate_request(TotpLoginIn)
@validate_response(SessionOut, 200)
async def login_totp(data: TotpLoginIn) -> SessionOut:
    """Finish logging in with a TOTP code (or a recovery code); answers with a session token."""
    grant = await operators.login_totp(db(), mfa_token=data.mfa_token, code=data.code, address=_address())
    return SessionOut(access_token=grant.access_token, expires_at=grant.expires_at)


@blueprint.post("/logout")
@requires_operator
@validate_response(LoggedOut, 200)
async def logout() -> LoggedOut:
    """End the calling operator session at once."""
    return LoggedOut(session_id=await operators.logout(db(), principal=current_principal()))


@blueprint.get("/me")
@requires_scopes()
@validate_response(MeOut, 200)
async def me() -> MeOut:
    """Who the bearer token stands for: kind, tenant, scopes."""
    principal = current_principal()
    return MeOut(
        kind=principal.kind,
        client_id=principal.client_id,
        scopes=sorted(principal.scopes),
        operator_id=principal.operator_id,
        email=await operators.operator_email(db(), principal=principal),
        key_id=principal.key_id,
        max_queued_tasks=principal.max_queued_tasks,
    )


@blueprint.post("/totp/enroll")
@requires_operator
@validate_response(TotpEnrollOut, 200)
async def totp_enroll() -> TotpEnrollOut:
    """Start TOTP re-enrolment: a new secret that takes over once a code from it is confirmed."""
    enrollment = await operators.enroll_totp(db(), principal=current_principal())
    return TotpEnrollOut(secret=enrollment.secret, provisioning_uri=enrollment.provisioning_uri)


@blueprint.post("/totp/confirm")
@requires_operator
@validate_request(TotpConfirmIn)
@validate_response(RecoveryCodesOut, 200)
async def totp_confirm(data: TotpConfirmIn) -> RecoveryCodesOut:
    """Confirm TOTP re-enrolment with a code; answers with 10 new single-use recovery codes."""
    codes = await operators.confirm_totp(
        db(), principal=current_principal(), code=data.code, address=_address()
    )
    return RecoveryCodesOut(recovery_codes=codes)


@blueprint.post("/clients")
@requires_scopes("clients:admin")
@requires_operator
@validate_request(ClientIn)
@validate_response(ClientCreatedOut, 201)
async def create_client(data: ClientIn) -> tuple[ClientCreatedOut, int]:
    """Create an API client; its first API key is in the answer and never shown again."""
    _, key = await clients.create_client(
        db(),
        name=data.name,
        scopes=data.scopes,
        created_by=current_principal().operator_id,
        max_queued_tasks=data.max_queued_tasks,
        rate_limit_per_s=data.rate_limit_per_s,
    )
    return ClientCreatedOut(client_id=key.client_id, key_id=key.key_id, api_key=key.api_key), 201


@blueprint.get("/clients")
@requires_scopes("clients:admin")
@validate_querystring(PageQuery)
@validate_response(ClientList, 200)
async def list_clients(query_args: PageQuery) -> ClientList:
    """List API clients (an API client sees only itself), oldest first, in pages of `limit`
    (`next_cursor`)."""
    items, next_cursor = await clients.list_clients(
        db(), principal=current_principal(), limit=query_args.limit, cursor=query_args.cursor
    )
    return ClientList(items=[ClientOut.model_validate(item) for item in items], next_cursor=next_cursor)


@blueprint.get("/clients/<uuid:client_id>")
@requires_scopes("clients:admin")
@validate_response(ClientOut, 200)
async def get_client(client_id: UUID) -> ClientOut:
    """One API client."""
    return ClientOut.model_validate(
        await clients.get_client(db(), principal=current_principal(), client_id=client_id)
    )


@blueprint.post("/clients/<uuid:client_id>/disable")
@requires_scopes("clients:admin")
@requires_operator
@validate_response(ClientOut, 200)
async def disable_client(client_id: UUID) -> ClientOut:
    """Disable a client: every one of its keys is refused from the next request on."""
    client = await clients.set_disabled(
        db(), principal=current_principal(), client_id=client_id, disabled=True
    )
    return ClientOut.model_validate(client)


@blueprint.post("/clients/<uuid:client_id>/enable")
@requires_scopes("clients:admin")
@requires_operator
@validate_response(ClientOut, 200)
async def enable_client(client_id: UUID) -> ClientOut:
    """Enable a disabled client again."""
    client = await clients.set_disabled(
        db(), principal=current_principal(), client_id=client_id, disabled=False
    )
    return ClientOut.model_validate(client)


@blueprint.get("/clients/<uuid:client_id>/keys")
@requires_scopes("clients:admin")
@validate_querystring(PageQuery)
@validate_response(KeyList, 200)
async def list_keys(client_id: UUID, query_args: PageQuery) -> KeyList:
    """A client's API keys (prefixes and dates; the keys themselves are never stored), newest
    first, in pages of `limit` (`next_cursor`)."""
    keys, next_cursor = await clients.list_keys(
        db(),
        principal=current_principal(),
        client_id=client_id,
        limit=query_args.limit,
        cursor=query_args.cursor,
    )
    return KeyList(items=[KeyOut.model_validate(key) for key in keys], next_cursor=next_cursor)


@blueprint.post("/clients/<uuid:client_id>/keys")
@requires_scopes("clients:admin")
@validate_response(KeyCreatedOut, 201)
async def create_key(client_id: UUID) -> tuple[KeyCreatedOut, int]:
    """Issue another API key for a client (shown once)."""
    key = await clients.issue_key(db(), principal=current_principal(), client_id=client_id)
    return KeyCreatedOut(key_id=key.key_id, api_key=key.api_key), 201


@blueprint.delete("/clients/<uuid:client_id>/keys/<uuid:key_id>")
@requires_scopes("clients:admin")
@validate_response(KeyOut, 200)
async def revoke_key(client_id: UUID, key_id: UUID) -> KeyOut:
    """Revoke an API key; it is refused from the next request on."""
    key = await clients.revoke_key(db(), principal=current_principal(), client_id=client_id, key_id=key_id)
    return KeyOut.model_validate(key)


@blueprint.get("/clients/<uuid:client_id>/signing-secrets")
@requires_scopes("clients:admin")
@validate_querystring(ListQuery)
@validate_response(SigningSecretList, 200)
async def list_signing_secrets(client_id: UUID, query_args: ListQuery) -> SigningSecretList:
    """The secrets that sign this tenant's HTTP deliveries, newest first: at most 3 (no pages)."""
    items = await clients.list_signing_secrets(db(), principal=current_principal(), client_id=client_id)
    return _secrets(items)


@blueprint.post("/clients/<uuid:client_id>/signing-secrets")
@requires_scopes("clients:admin")
@validate_response(SigningSecretList, 201)
async def add_signing_secret(client_id: UUID) -> tuple[SigningSecretList, int]:
    """Rotate: add a signing secret; older ones keep signing until deleted.

    A client has at most 3 active signing secrets (each one signs every delivery): adding a fourth
    answers 409 (`urn:taskgate:problem:too-many-signing-secrets`); delete an old one first."""
    items = await clients.add_signing_secret(db(), principal=current_principal(), client_id=client_id)
    return _secrets(items), 201


@blueprint.delete("/clients/<uuid:client_id>/signing-secrets/<uuid:secret_id>")
@requires_scopes("clients:admin")
@validate_response(SigningSecretList, 200)
async def delete_signing_secret(client_id: UUID, secret_id: UUID) -> SigningSecretList:
    """Stop signing with a secret; answers with those still signing (the last cannot go)."""
    items = await clients.delete_signing_secret(
        db(), principal=current_principal(), client_id=client_id, secret_id=secret_id
    )
    return _secrets(items)
