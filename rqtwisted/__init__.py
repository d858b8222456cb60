"""
rqtwisted: RQ, the simple, reliable Unix job queue, rebuilt on Twisted.

A queue is a directory; a message is a directory holding a JSON file and its
attachments. One daemon (C{twistd -n rq}) keeps every queue of a root alive and
runs each message through its queue script.
"""

__version__ = "0.1.0"

#: The protocol version queue scripts and peers see (C{RQ_VER}, C{/q.json}).
RQ_VERSION = "1.18.3"
