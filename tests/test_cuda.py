"""On a GPU: the planner, calibration and surgery give what they give on the CPU.

The moments and refits live on the CPU in float64 wherever the model runs; these tests catch a
tensor left on the wrong side. CI has no GPU: they skip there and run on a lent GPU machine
(``python -m pytest tests/test_cuda.py``)."""

import pytest
import torch
from toys import images, toy

from decouple import DecoupleConfig, compress_

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (none here; CI has none)"
)


@pytest.mark.parametrize("criterion", ["energy", "output"])
def test_auto_plan_and_calibration_on_cuda_match_the_cpus(criterion):
    x = images(64)
    runs = {}
    for device in ("cpu", "cuda"):
        model = toy().to(device)
        calib = None if criterion == "energy" else x.to(device)
        result = compress_(
            model, DecoupleConfig(method="auto", fold_bn=True), (3, 8, 8), 0.6,
            criterion=criterion, calib_images=calib,
        )  # fmt: skip
        assert all(p.device.type == device for p in model.parameters())
        with torch.no_grad():
            runs[device] = (result.allocation.choice, model(x[:8].to(device)).cpu())
    (plan_cpu, out_cpu), (plan_gpu, out_gpu) = runs["cpu"], runs["cuda"]
    assert {n: (o.method, o.order, o.rank) for n, o in plan_cpu.items()} == {
        n: (o.method, o.order, o.rank) for n, o in plan_gpu.items()
    }
    torch.testing.assert_close(out_gpu, out_cpu, rtol=1e-6, atol=1e-8)
