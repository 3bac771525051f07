"""The inference shortcuts: the bfloat16 nearest-row search (re-measured in float32), the
EfficientNet-Lite teacher with folded BatchNorms and the map's upsampling and blur as two matmuls; each
against the plain computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import anomap.nn.memory as memory_mod
from anomap.nn.efficientnet import Teacher
from anomap.nn.filters import gaussian_blur, upsample_blur
from anomap.nn.memory import PatchMemory, knn_distance, nearest_distance, search_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("chunk", [7, 64, 5000])
def test_nearest_distance_equals_the_float32_knn(chunk):
    gen = torch.Generator().manual_seed(3)
    bank = torch.randn(400, 24, generator=gen) + 2  # off-centre, so ||b||^2 is large against d^2
    near = bank[torch.randint(0, 400, (90,), generator=gen)] + 0.05 * torch.randn(90, 24, generator=gen)
    far = torch.randn(90, 24, generator=gen) + 2
    for q in (near, far):
        brute = torch.cdist(q.double(), bank.double()).amin(1).float()
        exact = knn_distance(q, bank, 1)  # float32: ||q||^2 - 2 q.b + ||b||^2 cancels, ~1e-3 relative here
        torch.testing.assert_close(exact, brute, rtol=1e-3, atol=1e-4)
        got = nearest_distance(q, *search_rows(bank), chunk=chunk)
        torch.testing.assert_close(got, exact, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dim", [24, 152])
def test_nearest_distance_keeps_every_chunk_the_rounding_leaves_in_doubt(dim):
    # near-ties across chunks, as in a coreset of similar patches: 20 clusters with rows in every chunk.
    # Looking only in the chunk whose bfloat16 minimum is smallest misses the nearest row here for 3-15
    # of the 200 queries, by up to 3.5 %; the rounding bound keeps the right chunks, so the float32 pass
    # on them gives knn_distance's numbers (up to the GEMM's rounding)
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(20, dim, generator=gen) * 1.5
    bank = centres[torch.arange(2000) % 20] + 0.05 * torch.randn(2000, dim, generator=gen)
    q = centres[torch.randint(0, 20, (200,), generator=gen)] + 0.3 * torch.randn(200, dim, generator=gen)
    got = nearest_distance(q, *search_rows(bank), chunk=64)
    torch.testing.assert_close(got, knn_distance(q, bank, 1, chunk=64), rtol=2e-5, atol=1e-6)


def test_nearest_distance_of_bank_rows_is_zero_when_rounding_goes_negative():
    # a query equal to a bank row: its bfloat16 squared distance rounds to about 0, often below it; the
    # int16 reading of the chunk minima must keep that chunk, so the float32 pass finds the row itself
    gen = torch.Generator().manual_seed(5)
    bank = torch.randn(1000, 152, generator=gen) * 3 + 1
    q = bank[torch.randint(0, 1000, (300,), generator=gen)]
    qs = torch.cat([q, q.pow(2).sum(1, keepdim=True), torch.ones(300, 1)], 1)
    centres, rows = search_rows(bank)
    rounded = (torch.cat([qs[:, :-2].bfloat16(), memory_mod._split_bf16(qs[:, -2:-1]),
                          torch.ones(300, 2, dtype=torch.bfloat16)], 1) @ rows.T).float().amin(1)
    assert (rounded < 0).any()  # the case this test is about does occur
    got = nearest_distance(q, centres, rows, chunk=64)
    torch.testing.assert_close(got, knn_distance(q, bank, 1, chunk=64), rtol=0, atol=2e-2)
    assert float(got.max()) < 0.1  # float32 cancellation at ||b||^2 ~ 1500; the next row is ~40 away
    assert float(torch.cdist(q, bank).topk(2, largest=False).values[:, 1].min()) > 20


def test_memory_search_modes_agree_and_follow_the_bank(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    mem = PatchMemory(16)
    mem.set_bank(torch.randn(300, 16, generator=gen))
    q = mem.bank[:50] + 0.01 * torch.randn(50, 16, generator=gen)
    mem.bf16_search = True
    fast = mem(q)
    mem.bf16_search = False
    torch.testing.assert_close(fast, mem(q), rtol=1e-4, atol=1e-4)
    mem.bf16_search = True
    mem.set_bank(mem.bank[100:])  # the cached search rows follow a new bank
    torch.testing.assert_close(mem(q), knn_distance(q, mem.bank, 1), rtol=1e-4, atol=1e-4)
    mem.bank.mul_(2.0)  # ... and an in-place change of it
    torch.testing.assert_close(mem(q), knn_distance(q, mem.bank, 1), rtol=1e-4, atol=1e-4)


def test_memory_auto_search_is_float32_for_k_above_one_and_when_tracing(monkeypatch):
    calls = []
    real = memory_mod.nearest_distance
    monkeypatch.setattr(memory_mod, "nearest_distance", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(memory_mod, "cpu_has_bf16_matmul", lambda: True)
    mem = PatchMemory(8)
    mem.set_bank(torch.randn(64, 8))
    q = torch.randn(5, 8)
    mem(q)
    assert len(calls) == 1
    torch.jit.trace(mem, q, check_trace=False)  # what an ONNX export records: the float32 search
    assert len(calls) == 1
    mem.k = 3
    mem(q)
    assert len(calls) == 1
    mem.k = 1
    monkeypatch.setattr(memory_mod, "cpu_has_bf16_matmul", lambda: False)  # emulated bfloat16: float32
    mem(q)
    assert len(calls) == 1


def _reference(teacher: Teacher, x: torch.Tensor, n_taps: int) -> list[torch.Tensor]:
    """The package's own modules, block by block (BatchNorm, TF padding and ReLU6 unfused)."""
    net = teacher.net
    x = net._swish(net._bn0(net._conv_stem(teacher.normalise(x))))
    outs = []
    for i, block in enumerate(net._blocks[: teacher.taps[n_taps - 1] + 1]):
        x = block(x)
        if i in teacher.taps:
            outs.append(x)
    return outs


# 64: even, so TF pads the stride-2 convolutions' ends more (kernels with leading zeros); 97: odd, symmetric
@pytest.mark.parametrize("size", [64, 97])
def test_folded_lite_teacher_equals_the_package_network(size):
    teacher = Teacher("efficientnet_lite0", size)
    teacher.load_pretrained()
    folded = teacher.folded()
    convs = [folded.stem, *(c for b in folded.blocks for c in (b.expand, b.depthwise, b.project) if c is not None)]
    assert all(c.pad is None for c in convs)  # no padded copy of any input
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        for n_taps in (1, 3):
            got, ref = teacher(x, n_taps), _reference(teacher, x, n_taps)
            assert len(got) == n_taps
            for g, r in zip(got, ref, strict=True):
                assert g.shape == r.shape and g.is_contiguous()
                torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()))


def test_folded_teacher_is_rebuilt_when_its_weights_change():
    teacher = Teacher("efficientnet_lite0", 64)  # random weights
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = teacher(x)[0].clone()
        teacher.load_pretrained()  # copies into the same tensors: only their versions change
        after = teacher(x)[0]
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, _reference(teacher, x, 1)[0], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("grid", "size", "sigma"), [((40, 40), (320, 320), 4.0), ((7, 9), (50, 61), 2.5),
                                                     ((4, 4), (6, 6), 4.0), ((8, 8), (64, 64), 0.0)])
def test_upsample_blur_equals_bilinear_resize_then_gaussian_blur(grid, size, sigma):
    maps = torch.rand(3, *grid, generator=torch.Generator().manual_seed(1)) * 5
    ref = gaussian_blur(F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0], sigma)
    got = upsample_blur(maps, size, sigma)
    assert got.shape == ref.shape == (3, *size)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # (4, 4) -> (6, 6): the blur's radius is clamped
