"""Cuts the network of any Python process started with this folder on PYTHONPATH (tests only).

Every connection or name lookup that is not loopback raises, and is also written, one line each, to
the file named by QR_NETWORK_LOG: a library that catches the error and carries on still leaves a
trace a test can count. Loopback stays open: a Jupyter kernel talks to papermill over localhost.
"""
import os
import socket

LOCAL = ("127.0.0.1", "::1", "localhost", "0.0.0.0")
_connect, _getaddrinfo = socket.socket.connect, socket.getaddrinfo


def _refuse(what: str):
    if log := os.environ.get("QR_NETWORK_LOG"):
        with open(log, "a") as f:
            f.write(f"{os.getpid()} {what}\n")
    raise OSError(f"the test cut the network: {what}")


def connect(self, address):
    if isinstance(address, tuple) and address[0] not in LOCAL:
        _refuse(f"connect to {address}")
    return _connect(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host is not None and host not in LOCAL:
        _refuse(f"resolve {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
