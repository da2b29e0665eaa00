"""The data store: database access, the web app's schema, devices, users, certificate records.

May import server.errors and agent.protocol; never pki, broker, service or cli.
"""
