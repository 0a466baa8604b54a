"""Calibration in bounded memory: resumed at cut points or re-run, spilled or kept, in any batch
size, it gives the same refit as one pass over the whole set."""

import copy
import os
import tempfile

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from toys import images, toy

from decouple import DecoupleConfig, decouple_
from decouple.calibrate import segments as segments_module
from decouple.calibrate.layerwise import calibrate_, held_out, holdout_mask
from decouple.calibrate.segments import split
from decouple.calibrate.stream import LayerStream, batches, forward_order
from decouple.models import build_model
from decouple.surgery.bn_fold import fold_batchnorm_
from decouple.surgery.methods import FACTORED_LAYERS


def decoupled_pair(net: nn.Module, rank: int = 2):
    fold_batchnorm_(net)
    reference = copy.deepcopy(net)
    decouple_(net, DecoupleConfig(rank=rank))
    return net, reference


def factored(model):
    return [n for n, m in model.named_modules() if isinstance(m, FACTORED_LAYERS)]


def resnet8():
    torch.manual_seed(0)
    return build_model("cifar_resnet8").double().eval()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.b(torch.relu(self.a(x))))


def test_a_cut_inside_a_residual_block_carries_the_skip_value_beside_the_branch():
    net = nn.Sequential(Block(), Block()).double().eval()
    segs = split(net, ["0.a", "0.b", "1.a", "1.b"])
    owner, parts = segs.owner, segs.parts
    assert [owner[n] for n in ("0.a", "0.b", "1.a", "1.b")] == [0, 1, 2, 3]
    # before 0.b: the block's input (for the skip) and the relu of 0.a (0.b's input)
    assert set(parts[owner["0.b"]].takes) == {segs.first, segs.inputs["0.b"]}
    assert segs.inputs["0.a"] == segs.first
    got = segs(torch.randn(3, 4, 6, 6, dtype=torch.float64))
    # the last layer's output, and the block's input for the skip connection after it
    assert set(got) == {segs.outputs["1.b"], segs.inputs["1.a"]}


@pytest.mark.parametrize("make", [toy, resnet8])
def test_segments_compose_to_the_model_up_to_the_last_layer(make):
    net, _ = decoupled_pair(make())
    names = factored(net)
    segs = split(net, names)
    assert sorted(segs.owner) == sorted(names) and max(segs.owner.values()) == len(segs.parts) - 1
    x = images(5) if make is toy else torch.randn(5, 3, 32, 32, dtype=torch.float64)
    last = forward_order(net, names, x[:1])[-1]
    out = {}
    net.get_submodule(last).register_forward_hook(lambda m, i, o: out.setdefault("y", o))
    net(x)
    got = segs(x)[segs.outputs[last]]
    torch.testing.assert_close(got, out["y"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [toy, resnet8])
def test_calibration_runs_each_network_once_over_the_images(make):
    net, reference = decoupled_pair(make())
    x = images(12) if make is toy else torch.randn(12, 3, 32, 32, dtype=torch.float64)
    last = forward_order(net, factored(net), x[:1])[-1]
    seen: dict[tuple[str, str], int] = {}

    def count(key):
        return lambda mod, args: seen.__setitem__(key, seen.get(key, 0) + len(args[0]))

    for which, model in (("decoupled", net), ("reference", reference)):
        for n in factored(net):
            model.get_submodule(n).register_forward_pre_hook(count((which, n)))
    calibrate_(net, reference, x, batch_size=4)
    # each layer reads every image once (the decoupled one once more: an image orders layers;
    # its last layer's output is never needed)
    assert {k: v for k, v in seen.items() if k[0] == "reference"} == {
        ("reference", n): 12 for n in factored(net)
    }
    assert {k: v for k, v in seen.items() if k[0] == "decoupled"} == {
        ("decoupled", n): 1 + 12 * (n != last) for n in factored(net)
    }


def test_an_untraceable_model_is_re_run_from_its_input():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                return self.conv(x)
            return self.conv(-x)

    net = Branchy().double().eval()
    decouple_(net, DecoupleConfig(rank=1))
    with LayerStream(net, ["conv"], batches(images(4), 2)) as stream:
        assert not stream.resumes
        got = torch.cat([x for _, x in stream.run("conv", "input")])
    assert got.shape == (4, 3, 8, 8)


@pytest.mark.parametrize("start,count", [(0, 8), (3, 5), (7, 1), (13, 20), (64, 3)])
def test_held_out_images_do_not_depend_on_the_batching(start, count):
    whole = holdout_mask(start + count, 0.125)
    assert torch.equal(held_out(start, count, 0.125), whole[start:])
    assert not held_out(start, count, 0.0).any()


def force_rerun(monkeypatch):
    """Calibration as if ``torch.fx`` could not trace the model: re-run from the input."""

    def no_segments(*args):
        raise ValueError("pretend fx cannot trace it")

    monkeypatch.setattr("decouple.calibrate.stream.split", no_segments)


def assert_same_weights(a: nn.Module, b: nn.Module, what: str = "") -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12, msg=f"{what}: {k}")


def calibrated(make, x, **kwargs):
    net, reference = decoupled_pair(make())
    records = calibrate_(net, reference, x, **kwargs)
    return net, records


@pytest.mark.parametrize("make", [toy, resnet8])
def test_same_refit_in_any_batch_size_resumed_or_re_run_kept_or_spilled(
    make, monkeypatch, tmp_path
):
    x = images(40) if make is toy else torch.randn(24, 3, 32, 32, dtype=torch.float64)
    one_pass, records = calibrated(make, x, batch_size=len(x))
    assert all(r.error_after <= r.error_before + 1e-12 for r in records)
    variants = {
        "batches of 3": dict(batch_size=3),
        "spilled to disk": dict(batch_size=7, keep_bytes=0),
        "a DataLoader": dict(images=DataLoader(TensorDataset(x, torch.zeros(len(x))), 5)),
    }
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for what, kw in variants.items():
        net, _ = calibrated(make, kw.pop("images", x), **kw)
        assert_same_weights(one_pass, net, what)
    assert os.listdir(tmp_path) == []  # the spilled activations are gone

    force_rerun(monkeypatch)
    rerun, _ = calibrated(make, x, batch_size=9)
    assert_same_weights(one_pass, rerun, "re-run")


def test_spilling_writes_files_and_reads_them_back(tmp_path):
    net, _ = decoupled_pair(resnet8())
    names = forward_order(net, factored(net), torch.zeros(1, 3, 32, 32, dtype=torch.float64))
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    kept, spilled = [], []
    for keep, out in ((1 << 30, kept), (0, spilled)):
        with LayerStream(net, names, batches(x, 4), keep_bytes=keep, spill_dir=str(tmp_path)) as s:
            for n in names:
                out.append(torch.cat([v for _, v in s.run(n, "input")]))
            if keep == 0:
                assert s._count > 0 and any(tmp_path.iterdir())
    assert not any(tmp_path.iterdir())
    for a, b in zip(kept, spilled, strict=True):
        assert torch.equal(a, b)


def test_a_layer_called_twice_is_refused_by_the_splitter():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), conv)
    with pytest.raises(ValueError, match="exactly once"):
        segments_module.split(net, ["0"])


def test_the_pipeline_takes_a_dataloader_for_the_data_criterion_and_the_refit():
    from decouple import compress_

    x = images(40)
    nets = []
    for source in (x, DataLoader(TensorDataset(x), batch_size=6)):
        net = toy()
        result = compress_(
            net, DecoupleConfig(fold_bn=True), (3, 8, 8), target_flops=0.6, criterion="data",
            calib_images=source,
        )  # fmt: skip
        assert result.calibration and result.allocation.criterion == "data"
        nets.append(net)
    assert nets[0].state_dict().keys() == nets[1].state_dict().keys()
    assert_same_weights(*nets, "a DataLoader")


def test_a_first_factor_system_too_large_to_solve_is_skipped_and_said(monkeypatch):
    import decouple.calibrate.layerwise as layerwise

    x = images(24)
    net, reference = decoupled_pair(toy(), rank=2)
    sizes = {}
    real = layerwise.first_factor_system

    def size(fac):
        sizes[fac.weight_shape] = real(fac)
        return real(fac)

    monkeypatch.setattr(layerwise, "first_factor_system", size)
    monkeypatch.setattr(layerwise, "MAX_SYSTEM", 0)  # every system counts as too large
    for mode in ("auto", "alternating"):
        records = calibrate_(copy.deepcopy(net), reference, x, mode=mode)
        assert all(r.mode in ("last", "data-free") for r in records)
        assert all(r.skipped.startswith("alternating: its system has") for r in records)
        assert "alternating" not in records[0].errors
    # dw-pw couples all C·T·k² depthwise weights of a layer: conv2 of the toy has C = 8
    assert sizes[(8, 8, 3, 3)] == (8 * 2 * 9) ** 2


class LaterInPlace(nn.Module):
    """A value stored at one cut, changed in place in the next segment, read in the one after."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.c = (nn.Conv2d(3 if i == 0 else 6, 6, 3, padding=1) for i in range(3))
        self.d = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        z = y * 1.0
        w = self.b(y)
        z.mul_(2)
        return self.d(self.c(w) + z)


@pytest.mark.parametrize("keep", [1 << 30, 0])
def test_values_changed_in_place_give_the_refit_of_a_plain_re_run(monkeypatch, tmp_path, keep):
    def chain():
        torch.manual_seed(3)
        return nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.Hardswish(inplace=True),  # not idempotent
            nn.Conv2d(6, 6, 3, padding=1), nn.Hardswish(inplace=True),
            nn.Conv2d(6, 4, 3, padding=1),
        ).double().eval()  # fmt: skip

    def later():
        return LaterInPlace().double().eval()

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    x = images(16)
    resumed = [calibrated(make, x, batch_size=5, keep_bytes=keep)[0] for make in (chain, later)]
    force_rerun(monkeypatch)
    for make, got in zip((chain, later), resumed, strict=True):
        rerun, _ = calibrated(make, x, batch_size=5)
        assert_same_weights(got, rerun, f"re-run, {make.__name__}")


def test_a_pass_abandoned_halfway_leaves_no_file_and_refuses_to_go_on(tmp_path):
    """Values a batch no longer needs go during the pass; a pass stopped halfway cannot be
    resumed, so the stream says so, and nothing it spilled stays on disk."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1),
                        nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()  # fmt: skip
    x = torch.randn(12, 3, 5, 5)
    with LayerStream(net, ["2", "4"], batches(x, 4), keep_bytes=0, spill_dir=str(tmp_path)) as s:
        list(s.run("2", "input"))
        outputs = s.run("2", "output")
        next(outputs)
        outputs.close()  # abandoned after one batch
        assert not list(tmp_path.rglob("*.bin"))
        with pytest.raises(RuntimeError, match="abandoned"):
            list(s.run("4", "input"))
    assert not list(tmp_path.iterdir())


def test_default_memory_share_follows_available_memory_and_processes(monkeypatch):
    from decouple.calibrate import spill as stream

    gib = 1 << 30
    monkeypatch.setattr(stream, "available_memory", lambda: 64 * gib)
    assert stream.default_keep_bytes() == stream.KEEP_BYTES
    monkeypatch.setattr(stream, "available_memory", lambda: 8 * gib)
    assert stream.default_keep_bytes() == 8 * gib // 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes of one node share it
    assert stream.default_keep_bytes() == stream.MIN_KEEP_BYTES
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert stream.default_keep_bytes() == 8 * gib // 16
    monkeypatch.setattr(stream, "available_memory", lambda: None)
    assert stream.default_keep_bytes() == stream.MIN_KEEP_BYTES


class Counted:
    """A calibration source that counts the images it hands out."""

    def __init__(self, x: torch.Tensor, batch: int) -> None:
        self.x, self.batch, self.read = x, batch, 0

    def __iter__(self):
        for i in range(0, len(self.x), self.batch):
            self.read += len(self.x[i : i + self.batch])
            yield self.x[i : i + self.batch].clone()


def test_both_networks_start_from_one_reading_of_the_images():
    """Each image is loaded once for the two networks (a JPEG decoded once), not once each; the
    refit is the one a tensor of the same images gives."""
    x = images(12)
    net, reference = decoupled_pair(resnet8())
    source = Counted(x, 4)
    calibrate_(net, reference, source)
    assert source.read == 4 + 12  # one batch orders the layers, then one reading for both
    from_tensor, reference2 = decoupled_pair(resnet8())
    calibrate_(from_tensor, reference2, x, batch_size=4)
    assert_same_weights(net, from_tensor, "one reading")


class DoubledInPlace(nn.Module):
    def __init__(self, in_place: bool):
        super().__init__()
        torch.manual_seed(5)
        self.in_place = in_place
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        x = x.mul_(2) if self.in_place else x * 2
        return self.b(torch.relu(self.a(x)))


def test_a_first_segment_that_changes_its_input_in_place_changes_no_other_streams_input():
    x = images(12)
    got = {}
    for in_place in (True, False):
        net, reference = decoupled_pair(DoubledInPlace(in_place).double().eval())
        calibrate_(net, reference, DataLoader(TensorDataset(x), batch_size=4))
        got[in_place] = net
    assert_same_weights(got[True], got[False], "in place")
