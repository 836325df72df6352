"""serving.sam3.PendingImage: features freed as soon as the request lets go of them."""

import gc
import time
import weakref
from concurrent.futures import Future

import numpy as np

from conceptseg.serving.sam3 import PendingImage


class Features(dict):
    """A result the test can hold a weak reference to (plain dicts cannot)."""


def test_done_image_is_freed_without_the_cyclic_gc():
    gc.collect()
    gc.disable()  # what is freed here is freed by reference counts alone
    try:
        future: Future = Future()
        pending = PendingImage(future)
        future.set_result(Features(fpn0=np.zeros(8), fpn1=np.zeros(4), fpn2=np.zeros(2)))
        assert pending.fpn[0].shape == (8,)
        result = weakref.ref(future.result())
        del pending, future
        assert result() is None, "a reference cycle keeps the features until the cyclic GC runs"
    finally:
        gc.enable()


def test_elapsed_is_zero_while_running_then_submit_to_result():
    future: Future = Future()
    pending = PendingImage(future)
    assert pending.elapsed_ms == 0.0
    time.sleep(0.02)
    future.set_result({})
    elapsed = pending.elapsed_ms
    assert 15.0 <= elapsed < 2000.0
    time.sleep(0.01)
    assert pending.elapsed_ms == elapsed  # fixed at the result
