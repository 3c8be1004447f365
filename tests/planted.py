"""A planted checkpoint file for the tests that check nothing in a checkpoint runs code when it is resumed.

Unpickled, `RunsCode` opens (creates) its marker file: what a hostile file would do instead.
"""
from pathlib import Path


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")
