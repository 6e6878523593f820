"""The operator console (/ui): server-rendered pages over the services, with vendored assets only.

`blueprint` is registered by app/routes/adapter.py under /ui; its static files (htmx, Swagger UI,
the stylesheet) are served from this package, so the console and /docs work offline.
"""

from app.ui.views import blueprint

STATIC_URL = "/ui/static"
SWAGGER_JS_URL = f"{STATIC_URL}/vendor/swagger-ui/swagger-ui-bundle.js"
SWAGGER_CSS_URL = f"{STATIC_URL}/vendor/swagger-ui/swagger-ui.css"

__all__ = ["STATIC_URL", "SWAGGER_CSS_URL", "SWAGGER_JS_URL", "blueprint"]
