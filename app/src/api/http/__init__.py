"""The `http` provider adapter: Taskgate as a reliable caller of other services.

OutboundHttp (client.py) is the one process-wide component: a pooled aiohttp session whose
resolver refuses forbidden addresses, the request signer, and the host gate (per-host permits and
circuit breaker in PostgreSQL, gate.py). The kind's handler (delivery.py, declared in kind.py) and
the scheduler's poller of waiting tasks (poller.py) both go through it.
"""

RESOURCE_KEY = "http"  # TaskContext.resources / Scheduler resources key of the OutboundHttp
