"""Clients in other languages, run as subprocesses against a real server."""
