import mmap
import sys

import pytest

from upcycle.eval.peak_memory import peak_rss_mb, reset_peak, rss_mb

MB = 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak resets on Linux only")
def test_peak_of_a_phase_forgets_what_came_before_and_sees_what_happened_in_it():
    big = bytearray(300 * MB)  # zero-filled: every page touched
    del big
    before_reset = peak_rss_mb()
    assert before_reset >= 300  # the lifetime peak saw the 300 MB
    assert reset_peak()
    after_reset = peak_rss_mb()
    assert after_reset < before_reset - 200  # the mark now starts from what the process holds
    assert after_reset <= rss_mb() + 50
    # a fresh mapping, every page written: a bytearray may reuse pages an earlier test freed and the process
    # still holds (its RSS then does not grow; seen after tests/pipelines in one process)
    phase = mmap.mmap(-1, 120 * MB)
    for offset in range(0, 120 * MB, 4096):
        phase[offset] = 1
    assert peak_rss_mb() >= after_reset + 100  # and it grows with what the phase allocates
    phase.close()
