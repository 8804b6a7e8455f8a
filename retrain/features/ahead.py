"""The images to compute, decoded while the module loads.

A cold run's module phase (the op audit, loading the module, tracing and probing it, converting it
for LiteRT) is one thread of Python; on a 2-core machine the other core waits, and then the
bottleneck phase decodes every image and runs the module at once, on both. ``DecodedAhead``
starts the decoding as soon as the images to compute are known (after the scan, before the module
loads: the input size is read from the module's ``saved_model.pb``), on one thread of its own
(``iter_image_batches`` with one decoding call at a time, so it takes the idle core and leaves the
loading thread its own), and keeps the batches until extraction takes them, up to ``BUDGET_BYTES``
of pixels; past the budget it waits, and extraction takes the rest as it would have. The pixels
are those ``iter_image_batches`` gives extraction in any case: the same decoders, the same batches.

Measured on 2,000 cats/dogs images, cold default ``train``, 2 cores: see the README's "Fixed costs".
"""

from __future__ import annotations

import threading
from collections import deque

from ..data.images import iter_image_batches

BUDGET_BYTES = 384 << 20  # decoded pixels held at most (2,600 images at 224x224)
_DONE = object()


class DecodedAhead:
    """``iter_image_batches(images, ...)`` run on a thread from now on; iterate it (once) for its
    batches, in its order. ``matches`` says whether it decodes what extraction needs; ``close``
    stops it (a run that fails before extraction, or one that needs something else)."""

    def __init__(self, images, height: int, width: int, batch_size: int, budget_bytes: int = BUDGET_BYTES):
        self.keys = [image.content_hash for image in images]
        self.size, self.batch_size = (height, width), batch_size
        self._budget = budget_bytes
        self._held, self._bytes, self._stopped, self._taken = deque(), 0, False, False
        self._ready = threading.Condition()
        paths, decoders = [i.path for i in images], [i.decoder for i in images]
        self._thread = threading.Thread(target=self._decode, args=(paths, decoders), name="decode-ahead", daemon=True)
        self._thread.start()

    def matches(self, images, height: int, width: int, batch_size: int) -> bool:
        return (not self._taken and (height, width) == self.size and batch_size == self.batch_size
                and [image.content_hash for image in images] == self.keys)

    def _decode(self, paths, decoders) -> None:
        try:
            batches = iter_image_batches(paths, decoders, *self.size, self.batch_size, parallel_calls=1)
            for item in batches:
                size = 0 if item[1] is None else item[1].nbytes
                with self._ready:
                    while not self._stopped and self._held and self._bytes + size > self._budget:
                        self._ready.wait()
                    if self._stopped:
                        return
                    self._held.append(item)
                    self._bytes += size
                    self._ready.notify_all()
            item = _DONE
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, raised there
            item = error
        with self._ready:
            self._held.append(item)
            self._ready.notify_all()

    def __iter__(self):
        self._taken = True
        while True:
            with self._ready:
                while not self._held:
                    self._ready.wait()
                item = self._held.popleft()
                if item is not _DONE and not isinstance(item, BaseException):
                    self._bytes -= 0 if item[1] is None else item[1].nbytes
                self._ready.notify_all()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop decoding and drop what is held; returns once the thread has let go of its files
        (it finishes the batch it is decoding)."""
        with self._ready:
            self._stopped = True
            self._held.clear()
            self._bytes = 0
            self._ready.notify_all()
        self._thread.join()


__all__ = ["BUDGET_BYTES", "DecodedAhead"]


def decode_ahead(images, config, audit, digest: str):
    """What the cache holds of ``images`` (a run's, for ``config``, a TrainConfig), and the rest
    decoding on a thread of their own (``DecodedAhead``), at the size the module's protobuf
    declares (``audit``, its AuditResult); (None, None) when it declares none that this run can use
    (extraction then looks up and decodes as it would have)."""
    from ..safety import check_cache_folder
    from .bottlenecks import BottleneckCache, look_up
    from .module import InputSpec

    height, width = audit.image_size or (None, None)
    height, width = height or config.image_size, width or config.image_size
    if not height or not width:
        return None, None
    cache = BottleneckCache(check_cache_folder(config.resolved_cache_dir), digest, InputSpec(height, width).key())
    looked_up = look_up(images, cache)
    if not looked_up.todo:
        return looked_up, None
    return looked_up, DecodedAhead(looked_up.todo, height, width, config.batch_for_images(height, width))

