"""A session of several steps on the embedded default: every step a new process.

Run it with ``python examples/quickstart.py``; checkpoints go to
``$JOBRUNNER_STORE`` or ``./checkpoints``.
"""

from __future__ import annotations

import uuid

from jobrunner import Session

STEPS = [
    "import math\nr = 2",
    "def area():\n    return math.pi * r ** 2",
    "class Circle:\n    def __init__(self, radius):\n        self.radius = radius",
    "circles = [Circle(n) for n in range(1, 4)]\nprint(len(circles), 'circles')",
    "r = 3\narea()",
    "[round(math.pi * c.radius ** 2, 2) for c in circles]",
    "undefined_name + 1",
    "isinstance(circles[0], Circle), r",
]


def main() -> None:
    session = Session(f"quickstart-{uuid.uuid4().hex[:6]}")
    print(f"session {session.id} in {session.store.url}")
    for code in STEPS:
        result = session.run(code)
        print(f"\n>>> {code.replace(chr(10), chr(10) + '... ')}")
        if result.stdout:
            print(result.stdout, end="")
        if result.value is not None:
            print(result.value)
        if result.error is not None:
            print(f"{result.status}: {result.error} (the session is unchanged)")
        else:
            total = sum(vars(result.timings).values())
            print(f"[step {result.step} committed in {total * 1000:.0f} ms]")
    print(f"\n{len(session.history())} steps; variables now:")
    for variable in session.variables():
        print(f"  {variable.name}: {variable.type}")


if __name__ == "__main__":
    main()
