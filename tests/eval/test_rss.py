"""Resident memory is reported in MB of 10^6 bytes, the unit of every byte count it is compared with (weights,
files, bounds): a 200 MB buffer adds ~200 MB, not the ~191 a KiB / 1024 count would show."""

import torch

from ligero.eval.speed import current_rss_mb, peak_rss_mb, reset_peak_rss


def test_resident_memory_is_in_megabytes_of_a_million_bytes():
    before = current_rss_mb()
    buffer = torch.ones(50_000_000, dtype=torch.float32)  # 200e6 bytes, touched
    grown = current_rss_mb() - before
    assert 196 < grown < 204, grown
    assert peak_rss_mb() >= current_rss_mb() - 1
    del buffer
    if reset_peak_rss():
        assert peak_rss_mb() < before + 150
