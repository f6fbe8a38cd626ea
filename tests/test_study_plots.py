"""The study plot's weight axis: every tick readable."""
from plugins.ukd.study.plots import readable_ticks


def test_ticks_closer_than_the_ratio_are_dropped_and_the_rest_kept_in_order():
    assert readable_ticks({400, 1, 130, 10, 300, 100, 330, 0}) == [1, 10, 100, 300]
    assert readable_ticks([1, 10, 100, 160]) == [1, 10, 100, 160]
    assert readable_ticks([3, 10, 30, 100]) == [3, 10, 30, 100]
    assert readable_ticks([]) == []
