"""Write celery-operator plugins in Python.

A plugin is a Python module with one class named after the role it plays (``Scaler``,
``Shaper`` or ``Autoscaler``), subclassing the protocol componentize-py generates from the
WIT contract (``wit_world.exports.Scaler``); its method receives and returns the typed
dataclasses of that contract (``wit_world.exports.scaler.ScalingInput``, ``Decision``, ...).
``celery-operator-plugin build`` turns the module into a component; ``celery-operator-plugin
bindings`` writes those classes out for an editor.

The helpers here are plain Python, usable (and testable) without componentize-py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

#: The worlds of ``celery:operator`` a plugin can target, by role.
WORLDS = {
    "shaper": "shaper-plugin",
    "autoscaler": "autoscaler-plugin",
    "scaler": "scaler-plugin",
}

#: The WIT contract this SDK builds against.
WIT_DIR = Path(__file__).parent / "wit"


def settings(text: str) -> dict[str, Any]:
    """The plugin's settings (the JSON object text the host passes), as a dict.

    Raises ``ValueError`` when they are not a JSON object: turn it into a refusal with
    :func:`reject`.
    """
    value = json.loads(text or "{}")
    if not isinstance(value, dict):
        raise ValueError("settings must be a JSON object")
    return value


def backlog(queues: Iterable[Any]) -> int:
    """Tasks waiting or reserved in a sample's queues (``sample.queues``)."""
    return sum(q.ready + q.reserved for q in queues)


def clamp(value: int, low: int, high: int) -> int:
    """``value`` within ``[low, high]`` (``high`` wins if they cross)."""
    return min(high, max(low, value))


def replicas_for(tasks: float, per_replica: float) -> int:
    """Replicas so that each has at most ``per_replica`` tasks (0 for no tasks)."""
    if per_replica <= 0:
        raise ValueError("per_replica must be positive")
    return math.ceil(tasks / per_replica) if tasks > 0 else 0


def reject(message: str) -> None:
    """Answers the call with an error (the WIT's ``result`` error): the host's failure
    policy decides what happens. Any other exception traps the plugin instead."""
    from componentize_py_types import Err  # only inside a component

    raise Err(message)
