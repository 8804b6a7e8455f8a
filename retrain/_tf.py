"""Import TensorFlow once, quietly.

TensorFlow and LiteRT print start-up lines (oneDNN, CUDA stubs, CPU features, XNNPACK) from
C++ before any logging is configured, so ``TF_CPP_MIN_LOG_LEVEL`` alone does not silence them:
the known way is to point file descriptor 2 elsewhere meanwhile. What was printed is replayed
if the guarded step fails, so no error is hidden. A user's own ``TF_CPP_MIN_LOG_LEVEL`` wins.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile

_tf = None


@contextlib.contextmanager
def quiet_stderr():
    """Swallow what C++ code writes to fd 2 during the block; replay it if the block raises."""
    if os.environ.get("RETRAIN_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tf():
    """The ``tensorflow`` module, imported on first use with its start-up noise silenced."""
    global _tf
    if _tf is not None:
        return _tf
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_stderr():
        import tensorflow

        tensorflow.config.list_physical_devices()  # device discovery logs (cuInit...) happen here
    tensorflow.get_logger().setLevel("ERROR")
    _tf = tensorflow
    return _tf
