"""Development harness: local Mosquitto and MongoDB-wire servers, simulated boards, demo.

Used by tests, bench and scripts/demo.sh; may import anything; agent and server never import it.
"""
