"""The factory station: programs boards over serial and registers them (design.md §5).

May import server.pki, server.store, server.config and agent.factory; not service or cli.
"""
