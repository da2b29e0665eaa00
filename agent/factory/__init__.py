"""The factory side of the board: framed serial protocol, serial link, factory console.

May import the agent's core (protocol, errors, birth, identity, keystore); nothing of server.
"""
