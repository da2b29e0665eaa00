"""The factory station: programs boards over serial and registers them (design.md §5)."""
