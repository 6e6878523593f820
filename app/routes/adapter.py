"""The one place that maps domains to URL prefixes: /api/<module>, and the console at /ui."""

from __future__ import annotations

from quart import Quart

from app.routes.auth import blueprint as auth
from app.routes.catalog import blueprint as catalog
from app.routes.common import blueprint as common
from app.routes.common import metrics
from app.routes.hosts import blueprint as hosts
from app.routes.queues import blueprint as queues
from app.routes.schedules import blueprint as schedules
from app.routes.tasks import blueprint as tasks
from app.routes.workers import blueprint as workers
from app.ui import blueprint as console
from app.ui.views import favicon
from app.ui.views import root as console_root

BLUEPRINTS = {
    "auth": auth,
    "common": common,
    "tasks": tasks,
    "queues": queues,
    "schedules": schedules,
    "catalog": catalog,
    "workers": workers,
    "hosts": hosts,
}


def register_blueprints(app: Quart) -> None:
    for module, blueprint in BLUEPRINTS.items():
        app.register_blueprint(blueprint, url_prefix=f"/api/{module}")
    app.register_blueprint(metrics)
    app.register_blueprint(console, url_prefix="/ui")
    app.add_url_rule("/", "console_root", console_root)
    app.add_url_rule("/favicon.ico", "favicon", favicon)
