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


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """What ``MALLOC_ARENA_MAX=2`` does, set before TensorFlow starts its threads.

    glibc gives threads that contend for malloc arenas of their own (up to 8 per core). tf.data's
    decoders allocate each image in their threads and the main thread frees it, and the memory
    scattered over many arenas grew with the number of images: peak RSS of extracting 3,000 vs
    15,000 generated images rose by 46 MB with the default arenas and by 13 MB with two, at
    64 images per batch; extraction was 1.5 % slower. A user's own ``MALLOC_ARENA_MAX`` wins;
    elsewhere than glibc this does nothing."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, arenas)  # -8: M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): its allocator is left alone
        pass


# What TensorFlow's ``__init__`` imports last "so that any function/method that needs to happen
# at load time will trigger, eg registration of optimizers in the SavedModel registry": all of
# Keras (its package imports everything), 1.3 s of TensorFlow's 3.3 s import on a quiet machine
# here, 2.2 s of 6 s on a slower one. Only the minibatch head, fine-tuning and the full load of a
# module use Keras; each imports it first (``keras_registrations``), so nothing runs without it.
_DEFERRED_KERAS = ("keras.src.optimizers", "tf_keras.src.optimizers")


def tf():
    """The ``tensorflow`` module, imported on first use with its start-up noise silenced.

    TensorFlow's eager import of Keras is deferred: a ``None`` in ``sys.modules`` for the one
    module it imports makes that import fail at once, before Keras's package is touched, and
    TensorFlow passes over the failure (``except ImportError``). The marks are removed right
    after, so a later ``import keras`` imports it as ever."""
    global _tf
    if _tf is not None:
        return _tf
    _limit_malloc_arenas()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    marked = [name for name in _DEFERRED_KERAS if name not in sys.modules and name.split(".")[0] not in sys.modules]
    for name in marked:
        sys.modules[name] = None
    try:
        with quiet_stderr():
            import tensorflow

            tensorflow.config.list_physical_devices()  # device discovery logs (cuInit...) happen here
    finally:
        for name in marked:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]
    tensorflow.get_logger().setLevel("ERROR")
    _tf = tensorflow
    return _tf


def keras_registrations() -> None:
    """What TensorFlow's import would have done and ``tf`` deferred: Keras's optimizers imported
    (and whatever they register). Called before the code that may need them: the minibatch head,
    fine-tuning, and loading a module whole."""
    import importlib

    tf()
    legacy = os.environ.get("TF_USE_LEGACY_KERAS") in ("true", "True", "1")  # TensorFlow's own test
    try:
        importlib.import_module("tf_keras.src.optimizers" if legacy else "keras.src.optimizers")
    except (ImportError, AttributeError):  # as TensorFlow's own import: without Keras, nothing to register
        pass
