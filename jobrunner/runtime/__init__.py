"""The step runtime: what runs in every step's process, locally or in a pod.

Started as ``python -m jobrunner.runtime --store URL --session ID --attempt ID``.
It imports nothing of the control side (no kubernetes, typer or rich): its
import time is part of every step's latency.
"""
