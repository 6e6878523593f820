"""The task engine's rules in one place: how a task is created (submit), what a finished attempt
means (outcomes), and what they share (caches, rules).
"""
