"""
Reading raw HTTP/1.x answers in tests (what curl -i prints, or what a
L{StringTransport} holds).
"""

from __future__ import annotations


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    """
    The status code and the headers (lower-case names, the last value of a
    repeated one) of an answer's head: its status line and header lines,
    without the blank line ending it.
    """
    lines = head.decode("latin-1").split("\r\n")
    code = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return code, headers
