"""Shared by every role; with client/ it is all a hospital runs."""

__version__ = "0.1.0"  # the release; server and sites must agree (the handshake checks it)
