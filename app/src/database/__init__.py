"""Repositories, one per aggregate; they return domain objects, never rows."""
