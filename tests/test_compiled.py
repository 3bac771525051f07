"""torch.compile inference (anomap.compiled): fixed batch shape, eager fallback, invalidation, real compile."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import anomap
from anomap.cli import main
from anomap.compiled import CompiledPredict
from conftest import TINY, make_category

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def det(tmp_path_factory) -> anomap.Detector:
    data = make_category(tmp_path_factory.mktemp("compiled") / "cat")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    d = anomap.create("ssl_ae", **{**TINY, "max_steps": 3}).fit(data, progress=False)
    torch.set_num_threads(before)
    d.data_path = data  # for rescore
    return d


def _images(n: int, det: anomap.Detector, seed: int = 0) -> torch.Tensor:
    s = det.config.image_size
    return torch.rand(n, det.channels, s, s, generator=torch.Generator().manual_seed(seed))


class _Recorder:
    """A stand-in compiler: returns the eager function and records every batch shape it is called with."""

    def __init__(self) -> None:
        self.shapes: list[int] = []
        self.calls = 0

    def __call__(self, fn, **kwargs):
        self.calls += 1
        assert kwargs == {"dynamic": False, "options": {"freezing": True}}

        def run(x):
            self.shapes.append(x.shape[0])
            return fn(x)
        return run


@pytest.mark.parametrize("n", [1, 3, 4, 5, 9])
def test_every_call_has_the_compiled_batch_shape_and_results_match_eager(det, n):
    rec = _Recorder()
    cp = CompiledPredict(det.model, batch_size=4, compiler=rec)
    x = _images(n, det)
    with torch.no_grad():
        want_s, want_m = det.model.predict(x)
        got_s, got_m = cp(x)
    assert rec.calls == 1 and set(rec.shapes) == {4} and len(rec.shapes) == -(-n // 4)
    assert got_s.shape == (n,) and got_m.shape == want_m.shape
    torch.testing.assert_close(got_s, want_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_m, want_m, rtol=1e-5, atol=1e-6)


def test_a_failing_compiler_warns_once_and_falls_back_to_eager(det):
    def broken(fn, **kwargs):
        def run(x):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return run

    cp = CompiledPredict(det.model, batch_size=2, compiler=broken)
    x = _images(3, det)
    with pytest.warns(RuntimeWarning, match="could not compile .*no C\\+\\+ compiler found.*eager PyTorch"):
        s1, m1 = cp(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s2, _ = cp(x)  # no second warning, still eager
    with torch.no_grad():
        want_s, want_m = det.model.predict(x)
    assert cp.failed and "RuntimeError" in cp.failed
    torch.testing.assert_close(s1, want_s)
    torch.testing.assert_close(m1, want_m)
    torch.testing.assert_close(s2, want_s)


def test_batch_size_must_be_positive(det):
    with pytest.raises(ValueError, match="batch_size"):
        CompiledPredict(det.model, batch_size=0)


def test_rescore_recompiles_with_the_new_scoring_settings(det, monkeypatch):
    made = []

    class Fake(CompiledPredict):
        def __init__(self, model, batch_size, compiler=None):
            super().__init__(model, batch_size, compiler=lambda fn, **kw: fn)
            made.append(self)

    monkeypatch.setattr("anomap.detector.CompiledPredict", Fake)
    det.compile(batch_size=2, warmup=False)
    assert det._compiled is made[-1]
    sigma = det.config.smoothing_sigma
    det.rescore({"smoothing_sigma": sigma + 1.0}, det.data_path)
    assert len(made) == 2 and det._compiled is made[-1] and made[-1].batch_size == 2
    det.rescore({"smoothing_sigma": sigma}, det.data_path)
    det._compiled = None


def test_onnx_backend_refuses_compile(tmp_path, capsys):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not used")
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "a.png")
    rc = main(["predict", str(onnx), str(tmp_path / "imgs"), "--compile"])
    assert rc != 0
    assert "--compile applies to the torch backend" in capsys.readouterr().err


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="no C++ compiler: torch.compile cannot build kernels here (the fallback is tested above)")
def test_real_torch_compile_matches_eager(det):
    """TorchInductor on this machine (needs a C++ compiler, as the CI image has): same maps as eager."""
    s = det.config.image_size
    imgs = np.random.default_rng(1).integers(0, 256, (3, s, s, det.channels), dtype=np.uint8)
    want_s, want_m = det.predict_raw(imgs)
    det.compile(batch_size=2)
    try:
        assert det._compiled is not None
        got_s, got_m = det.predict_raw(imgs)
        assert det._compiled.failed is None, det._compiled.failed
    finally:
        det._compiled = None
    np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_m, want_m, rtol=1e-4, atol=1e-5)
