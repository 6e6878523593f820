"""The task engine's rules in one place: how a task is created (submit) and what it shares."""
