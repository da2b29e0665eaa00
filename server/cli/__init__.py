"""The `provision-server` command line: database, devices, users, CA, broker, run.

Top of the server: may import every server package; nothing imports it.
"""
