"""Transport layer: one blueprint per domain, registered in adapter.py."""
