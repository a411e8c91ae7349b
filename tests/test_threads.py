"""Thread policy: the user's setting wins, every pool gets the same count, the counts are recorded."""

from __future__ import annotations

import pytest
import torch

from ussbench import threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    threads.configure_threads(before)


def test_explicit_settings_win_in_order(monkeypatch):
    monkeypatch.delenv("USSBENCH_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.requested_threads() is None
    assert threads.run_threads() == threads.available_cpus()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.run_threads() == 3
    assert threads.decode_workers("cpu") == 0 and threads.decode_workers("cuda") == 1  # beside a GPU only
    monkeypatch.setenv("USSBENCH_THREADS", "1")
    assert threads.run_threads() == 1 and threads.decode_workers("cuda") == 0 and threads.crf_workers() == 1
    monkeypatch.setenv("USSBENCH_THREADS", "zero")  # not a count: ignored, OMP_NUM_THREADS applies
    assert threads.run_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "0")
    assert threads.run_threads() == threads.available_cpus()


def test_configure_sizes_torch_faiss_and_blas_and_records_them(monkeypatch, restore_threads):
    faiss = pytest.importorskip("faiss")
    monkeypatch.setenv("USSBENCH_THREADS", "2")
    record = threads.configure_threads(1)  # an explicit count beats the environment
    assert torch.get_num_threads() == 1 and faiss.omp_get_max_threads() == 1
    assert record["threads_torch"] == 1 and record["threads_omp"] == 1
    assert record["threads_blas"] in (None, 1)
    assert record["threads_decode"] == 0 and record["threads_crf"] == 1  # ussbench's own pools follow it too
    assert threads.run_threads() == 1
    from threadpoolctl import ThreadpoolController

    libs = ThreadpoolController().lib_controllers
    assert all(lib.num_threads == 1 for lib in libs)  # every pool at the (explicit) count of 1
    threads.configure_threads(2)
    libs = ThreadpoolController().lib_controllers
    assert torch.get_num_threads() == 2 and faiss.omp_get_max_threads() == 2
    assert all(lib.num_threads == (1 if threads.spinning_blas(lib) else 2) for lib in libs)
    assert threads.thread_record()["threads_blas"] in (None, 1)  # numpy's spinning OpenBLAS stays at one
    with pytest.raises(ValueError, match="thread count must be >= 1"):
        threads.configure_threads(0)


def test_rows_record_numpys_blas_pool_not_faiss(restore_threads):
    """faiss bundles an OpenMP OpenBLAS that follows the run's count; the row's threads_blas is numpy's."""
    pytest.importorskip("faiss")
    from ussbench.graph.machine import thread_counts

    threads.configure_threads(2)
    counts = thread_counts()
    assert counts["threads_torch"] == 2 and counts["threads_blas"] in (None, 1)


def test_ray_task_threads_outside_a_task_default_to_one():
    ray_executor = pytest.importorskip("ussbench.graph.ray_executor")
    assert ray_executor.task_cpus() == 1
