"""Development profile: readable logs, everything in one process, an embedded database."""

from typing import Annotated, Literal

from pydantic_settings import NoDecode

from app.settings import Settings


class ProfileSettings(Settings):
    LOG_FORMAT: Literal["json", "console"] = "console"
    CORS_ORIGINS: Annotated[list[str], NoDecode] = ["https://localhost:8080"]
