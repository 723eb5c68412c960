"""One torch thread for a test module, restored afterwards.

Used as ``_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)``. Two
reasons, either enough: tiny batches on a busy 2-core machine run several times slower with a
second OpenMP thread spinning at barriers, and bit-exact comparisons between runs (one of them
in a subprocess) need both sides to sum in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator


def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
