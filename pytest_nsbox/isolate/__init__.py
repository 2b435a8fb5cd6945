"""Isolate mode: a test's own call, run in a sandboxed copy of the pytest process."""
