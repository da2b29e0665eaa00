"""PKI: the CAs, certificate building, CSR policy and the birth-certificate check.

May import server.errors and agent.protocol/agent.storage; nothing else of server.
"""
