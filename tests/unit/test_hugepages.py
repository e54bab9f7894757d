"""Tensors on transparent huge pages (expertmesh.platform.model.hugepages), no Ray."""

from __future__ import annotations

import gc

import pytest
import torch

from expertmesh.platform.model import hugepages


def test_small_tensors_are_plain() -> None:
    t = hugepages.empty((3, 5), torch.bfloat16)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and t.is_contiguous()


@pytest.mark.skipif(not hugepages.supported(), reason="no madvise(MADV_HUGEPAGE) here")
def test_large_tensors_start_on_a_huge_page_and_outlive_their_first_view() -> None:
    shape = (3, hugepages.HUGE_PAGE // 4 + 7)  # not a whole number of pages
    t = hugepages.empty(shape, torch.float32)
    assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(shape))
    row = t[2]
    del t
    gc.collect()  # the mapping must stay while a view of it lives
    assert torch.equal(row, torch.arange(2 * shape[1], 3 * shape[1], dtype=torch.float32))


def test_switch_off(monkeypatch) -> None:
    monkeypatch.setenv("EXPERTMESH_HUGE_PAGES", "0")
    assert not hugepages.supported()
    t = hugepages.empty((hugepages.HUGE_PAGE,), torch.uint8)
    assert t.numel() == hugepages.HUGE_PAGE
