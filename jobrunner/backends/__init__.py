"""Backends start the step runtime somewhere, stream its output and wait for it.

They never read or write checkpoints: the runtime does, and the session reads
the result from the store once the backend says the process has ended.
"""
