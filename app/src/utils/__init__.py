"""Small helpers shared by several layers."""
