"""A plugin for the Ray executor's tests, imported by the grid's ``plugins:`` in the driver and every worker.

``ray_test_segments`` is ``none`` (one segment per patch) that misbehaves on seed ``bad_seed``:
``mode: fail`` raises, ``mode: eio_once`` raises an I/O error on its first attempt only, ``mode: crash`` kills its own worker process on every attempt, ``mode: hang_once``
writes its pid to ``marker_dir`` and waits (to be killed from outside) on its first attempt only. Every
attempt leaves a file in ``marker_dir``, so a test counts the attempts across processes.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

from ussbench.image_clusterers.basic import PatchSegments
from ussbench.registry import register


@register("image_clusterer", "ray_test_segments")
class MisbehavingSegments(PatchSegments):
    """One segment per patch; misbehaves as ``mode`` says on ``bad_seed``."""

    def __init__(self, mode: str = "ok", bad_seed: int = -1, marker_dir: str = "", seed: int = 0):
        super().__init__()
        self.mode, self.bad_seed, self.marker_dir, self.seed = mode, bad_seed, marker_dir, seed

    def predict(self, features, ctx):
        if self.seed == self.bad_seed:
            folder = Path(self.marker_dir)
            folder.mkdir(parents=True, exist_ok=True)
            earlier = len(list(folder.glob(f"attempt-{self.seed}-*")))
            (folder / f"attempt-{self.seed}-{os.getpid()}-{earlier}").write_text(str(os.getpid()))
            if self.mode == "fail":
                raise RuntimeError(f"boom on seed {self.seed}")
            if self.mode == "eio_once" and earlier == 0:  # a shared filesystem's hiccup
                raise OSError(errno.EIO, "Input/output error (injected)")
            if self.mode == "crash":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.mode == "hang_once" and earlier == 0:
                (folder / "running.pid").write_text(str(os.getpid()))
                time.sleep(120)  # killed from outside long before this ends
        return super().predict(features, ctx)
