"""Device agent: birth identity, provisioning, mTLS session and factory console.

The agent runs on the board and imports nothing from ``server``.
"""

__version__ = "0.1.0"
