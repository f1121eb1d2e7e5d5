"""Rich outputs of a step: the figures it drew, as Jupyter's inline backend shows them.

Only what the step itself imported is looked at: matplotlib is never imported
here, because the runtime's import time is part of every step's latency.
"""

from __future__ import annotations

import base64
import io
import os
import sys

__all__ = ["collect_figures"]

# A step has no display: without this, matplotlib would look for a GUI toolkit.
# Set on import so that it holds before the step's code imports matplotlib.
os.environ.setdefault("MPLBACKEND", "Agg")


def collect_figures() -> list[dict[str, str]]:
    """Render every open matplotlib figure to PNG, close them, return the outputs.

    Returns:
        One ``{"image/png": base64 data}`` per figure, in the order they were
        created; a figure that cannot be rendered gives a ``text/plain`` output
        that says why. Empty when the step did not use ``matplotlib.pyplot``.
    """
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return []
    outputs = []
    for number in pyplot.get_fignums():
        buffer = io.BytesIO()
        try:
            pyplot.figure(number).savefig(buffer, format="png", bbox_inches="tight")
        except Exception as error:  # noqa: BLE001 - one broken figure is reported
            outputs.append(
                {"text/plain": f"<figure {number} could not be rendered: {error!r}>"}
            )
            continue
        outputs.append({"image/png": base64.b64encode(buffer.getvalue()).decode()})
    # Closed like the inline backend does, so that a figure kept in a variable
    # is neither shown again by the next step nor saved as an open figure.
    pyplot.close("all")
    return outputs
