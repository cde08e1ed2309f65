"""bench/whole_pass.py reads a run's wall time and peak memory from `/usr/bin/time -v` output."""

from __future__ import annotations

import pytest

from bench.whole_pass import time_log_figures

LOG = """Feature pass: 12,671 samples, 1,583,165 tokens
\tCommand being timed: "st2si adapt --domain amazon-scientific --head ilp --json"
\tElapsed (wall clock) time (h:mm:ss or m:ss): {wall}
\tMaximum resident set size (kbytes): 2048000
"""


@pytest.mark.parametrize(("wall", "seconds"), [("1:42:03", 6123.0), ("3:07.25", 187.25), ("0:00.50", 0.5)])
def test_wall_and_peak_rss_from_the_time_log(wall, seconds):
    assert time_log_figures(LOG.format(wall=wall)) == (pytest.approx(seconds), 2000.0)


def test_a_log_without_the_figures_is_refused():
    with pytest.raises(SystemExit, match="time -v"):
        time_log_figures("Feature pass: 12 samples\n")
