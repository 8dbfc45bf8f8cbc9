"""grpo.metrics.run_info: the end-of-run parameter checksums (README: "every rank's parameter checksum is gathered into
train/run_info.json (a mismatch stops the run)"). The 2-process runs in tests/test_distributed.py check that real
ranks agree; here the gather is a stand-in that returns this rank's checksum and a second rank's."""

import pytest
import torch
from accelerate.utils import DistributedType

from grpo.metrics import run_info


class TwoRanks:
    """An accelerator's gather across 2 processes, the other rank holding `other(model)`'s parameters."""

    num_processes, device, distributed_type = 2, "cpu", DistributedType.MULTI_CPU

    def __init__(self, other_checksum: float | None = None):
        self.other_checksum = other_checksum

    def gather(self, t):
        other = t if self.other_checksum is None else torch.tensor([self.other_checksum], dtype=t.dtype)
        return torch.cat([t, other])


def model(seed: int = 0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def checksum(m) -> float:
    return run_info(m, TwoRanks(), 0)["param_checksums"][0]


def test_equal_ranks_are_recorded():
    info = run_info(model(), TwoRanks(), 0)
    assert info["world_size"] == 2 and info["distributed_type"] == "MULTI_CPU" and info["zero_stage"] == 0
    a, b = info["param_checksums"]
    assert a == b != 0


def test_ranks_that_differ_stop_the_run():
    m = model()
    other = model()
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-3  # one weight of one rank moved
    with pytest.raises(RuntimeError, match="parameters differ across ranks after training"):
        run_info(m, TwoRanks(checksum(other)), 0)
    swapped = model()
    with torch.no_grad():  # the same values in other tensors: the checksum weights each tensor by its position
        b0, b1 = swapped[0].bias[:2].clone(), swapped[1].bias.clone()
        swapped[0].bias[:2], swapped[1].bias[:] = b1, b0
    with pytest.raises(RuntimeError, match="parameters differ"):
        run_info(m, TwoRanks(checksum(swapped)), 0)


def test_summation_noise_is_not_a_mismatch():
    m = model()
    a = checksum(m)
    run_info(m, TwoRanks(a * (1 + 1e-9)), 0)  # the same parameters summed in another order


def test_checksums_never_copy_a_whole_tensor_to_float64(monkeypatch):
    """The checksum runs at the very end of a run, after the final save: a float64 copy of a whole embedding (2x its
    fp32 size, 4x bf16, twice) could run a long job out of memory there. It goes a chunk at a time, and equals the
    whole-tensor float64 sums."""
    from grpo import metrics

    monkeypatch.setattr(metrics, "CHECKSUM_CHUNK", 7)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(50, 3), torch.nn.Linear(3, 5)).to(torch.bfloat16)
    expected = sum(
        float(p.double().sum()) * (i + 2) + float(p.double().abs().sum()) for i, p in enumerate(m.parameters())
    )
    converted = []
    double = torch.Tensor.double
    monkeypatch.setattr(torch.Tensor, "double", lambda t: converted.append(t.numel()) or double(t))
    assert checksum(m) == pytest.approx(expected, rel=1e-12)
    assert converted and max(converted) <= 7
