"""The statistics `fusedmoe bench --timeline` reports, on hand-made timelines."""
from fusedmoe.bench import timeline_stats, union_ns


def test_union_merges_overlaps_and_keeps_gaps():
    assert union_ns([]) == 0
    assert union_ns([(0, 10), (5, 15), (20, 30)]) == 25
    assert union_ns([(20, 30), (0, 10), (10, 12)]) == 22


def test_busy_gemm_and_overlap():
    # rows: start, end, block, sm, rank, kind (0 router, 1 dispatch, 2 GEMM0, 3 GEMM1, 4 combine)
    events = [(0, 10, 0, 0, 0, 1), (0, 30, 0, 0, 0, 4), (5, 20, 1, 1, 0, 2), (20, 25, 1, 1, 0, 3)]
    st = timeline_stats(events)
    assert st["blocks"] == 2 and st["tasks"] == 2
    assert st["span_ms"] == 30 / 1e6
    assert st["sm_busy"] == 100.0 * (30 + 20) / 60  # block 0 covers 30 ns, block 1 covers 20 ns
    assert st["gemm_busy"] == 100.0 * 20 / 60
    assert st["overlap"] == 50.0  # dispatch [0, 10) meets GEMMs from 5 on


def test_scheduler_lookups_are_not_busy_time():
    # kind 5: the scheduler thread looking up a task; it overlaps the block's GEMMs or idles.
    events = [(0, 10, 0, 0, 0, 2), (10, 30, 0, 0, 0, 5), (30, 40, 0, 0, 0, 3)]
    st = timeline_stats(events)
    assert st["sm_busy"] == 100.0 * 20 / 40 and st["tasks"] == 2
