"""steer.heap: keeping freed blocks for reuse."""

from steer import heap


def test_keep_freed_memory_sets_both_thresholds_and_is_a_no_op_without_glibc():
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))
            return 1

    assert heap.keep_freed_memory(FakeLibc())
    assert calls == [(heap.M_MMAP_THRESHOLD, 32 * 2**20), (heap.M_TRIM_THRESHOLD, 2**31 - 1)]
    assert heap.keep_freed_memory(object()) is False  # no mallopt: not glibc
