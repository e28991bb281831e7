"""Importable by Ray's worker processes (the test module puts this folder on their PYTHONPATH)."""

import os

from fastenc.integrations.ray import EmbedBatch


class DyingEmbedBatch(EmbedBatch):
    """``EmbedBatch`` whose actor process dies (``os._exit``) at the start of its third batch, once in all:
    the first actor to get there creates ``marker`` and dies; Ray restarts it and retries the batch."""

    def __init__(self, *args, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.marker = marker
        self.calls = 0

    def __call__(self, batch):
        self.calls += 1
        if self.calls == 3:
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                os._exit(1)
        return super().__call__(batch)
