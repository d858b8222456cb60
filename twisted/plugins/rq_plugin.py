"""
The C{twistd rq} plugin: runs an RQ root in one process.
"""

from twisted.application.service import ServiceMaker

rq = ServiceMaker(
    "rq",
    "rqtwisted.tap",
    "RQ: queues, queue scripts, web UI and admin socket of one root.",
    "rq",
)
