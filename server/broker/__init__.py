"""The broker: Mosquitto configuration, ACL rules, and the ACL/CRL sync with the database.

May import server.pki, server.store, server.errors and agent.protocol/agent.storage.
"""
