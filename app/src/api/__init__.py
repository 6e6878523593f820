"""Domain services: the rules of Taskgate, called by routes and by the worker runtime."""
