"""
Laying out pieces of a root by hand, as an operator would, in unit tests.
"""

from __future__ import annotations

import os
from typing import Any


def new_queue_dir(instance: Any, name: str, config: str) -> str:
    """
    Make the directory of queue C{name} under the instance's root holding
    only a C{config.json} with the text C{config}; the directory.
    """
    qdir = instance.root.queue_path(name)
    os.makedirs(qdir)
    with open(os.path.join(qdir, "config.json"), "w") as f:
        f.write(config)
    return qdir
