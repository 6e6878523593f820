"""Production profile: JSON logs, and no start without a database, secrets and a certificate."""

from typing import Any, Literal

from app.settings import ConfigurationError, Settings


class ProfileSettings(Settings):
    LOG_FORMAT: Literal["json", "console"] = "json"

    def model_post_init(self, context: Any, /) -> None:
        missing = self.missing_for_production()
        if missing:
            raise ConfigurationError("production needs " + ", ".join(missing))
