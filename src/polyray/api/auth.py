"""Bearer-key authentication for the API: who is calling, and may they call this route."""

from __future__ import annotations

from fastapi import Request

from polyray.api.state import AppState
from polyray.errors import Forbidden, Unauthenticated
from polyray.tenancy.accounts import ANONYMOUS
from polyray.tenancy.directory import Principal
from polyray.tenancy.keys import CLIENT_ROLE


def bearer_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, key = header.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


# Every 401 says how to send a key, in each of the three ways a caller can (one variable name
# everywhere: POLYRAY_API_KEY, read by the SDK and the CLI).
HOW_TO_SEND_A_KEY = (
    "send the header 'Authorization: Bearer <key>' (the polyray CLI takes --key <key> and the Python SDK "
    "api_key=...; both read the POLYRAY_API_KEY environment variable when not given one). "
    "The server prints a first client key on an empty database; an admin makes more with "
    "'polyray clients create NAME' or POST /v1/admin/clients"
)


def principal(request: Request) -> Principal | None:
    """The authenticated caller; None when the server runs without auth (loopback only)."""
    state: AppState = request.app.state.polyray
    if state.tenancy is None or not state.tenancy.auth_required:
        return None
    key = bearer_key(request)
    try:
        return state.tenancy.directory.authenticate(key)
    except Unauthenticated as exc:
        reason = "no API key" if not key else "the API key is not valid (unknown or revoked)"
        raise Unauthenticated(f"{reason}: {HOW_TO_SEND_A_KEY}", code=exc.code) from None


def client_name(request: Request) -> str:
    """The client a compute-spending call is charged to; admin keys spend no compute (403)."""
    who = principal(request)
    if who is None:
        return ANONYMOUS
    if who.client is None or who.role != CLIENT_ROLE:
        raise Forbidden("admin keys manage the service; call the API with a client key", code="admin_key_not_allowed")
    return who.client.name


def require_admin(request: Request) -> None:
    state: AppState = request.app.state.polyray
    if state.tenancy is None:
        raise Forbidden("this server runs without a client database: no admin API", code="no_tenancy")
    if not state.tenancy.auth_required:
        return  # auth = "none" is loopback-only by configuration: the operator is the caller
    who = principal(request)
    if who is None or not who.is_admin:
        raise Forbidden("this route needs an admin key", code="admin_only")
