"""The auth domain: operators (password + TOTP), sessions, API clients and keys, signing secrets.

What other domains call:
- `Authenticator` (Runtime.authenticator): bearer token → Principal, used by the middleware;
- `active_signing_secrets(db, client_id=...)`: a tenant's `whsec_...` secrets, newest first, to
  sign HTTP deliveries;
- `prune(db)`: housekeeping for the scheduler.
"""

from app.src.api.auth.authenticator import Authenticator
from app.src.api.auth.clients import active_signing_secrets
from app.src.api.auth.operators import prune

__all__ = ["Authenticator", "active_signing_secrets", "prune"]
