"""Pydantic DTOs and contracts shared by routes, services, the worker and provider adapters."""
