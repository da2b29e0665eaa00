"""Provisioning server: tokens, CSR signing, MongoDB status, broker ACL/CRL."""

__version__ = "0.1.0"
