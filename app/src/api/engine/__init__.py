"""The task engine's rules in one place: how a task is created and what a finished attempt means."""
