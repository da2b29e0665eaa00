"""The provisioning service: request handling, tokens, the MQTT transport and the runner.

May import server.pki, server.store, server.broker, server.config and agent.protocol.
"""
