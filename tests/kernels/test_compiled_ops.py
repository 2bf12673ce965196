"""The kernels' custom-op forms (torch.ops.ostnet.*), what torch.compile calls: the registrations pass
torch.library.opcheck (schema, autograd, fake tensors with the real kernel's shapes, dtypes and strides),
and a compiled graph (fullgraph: no break) gives the eager kernel's outputs and gradients.

CPU runs need TRITON_INTERPRET=1 (as the other kernel tests); float64 so that any difference is a bug.
"""
import importlib

import pytest
import torch

from tests.conftest import requires_triton_run

gs = importlib.import_module("ostnet_fast.kernels.grid_sample")
tg = importlib.import_module("ostnet_fast.kernels.tps_grid")
tw = importlib.import_module("ostnet_fast.kernels.tps_warp")
kh = importlib.import_module("ostnet_fast.kernels.keypoint_head")

pytestmark = [requires_triton_run(),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
F64 = dict(device=DEV, dtype=torch.float64)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def compare_compiled(fn, *inputs, tol=1e-10):
    """fn(*inputs) eagerly and under torch.compile(fullgraph=True): same outputs, same input gradients."""
    def run(f):
        leaves = _leaves(*inputs)
        outs = f(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs = [o for o in outs if o is not None]
        loss = sum((o * (1 + torch.arange(o.numel(), device=o.device, dtype=o.dtype).view(o.shape) % 7)).sum()
                   for o in outs)  # uneven upstream gradients
        loss.backward()
        return outs, [t.grad for t in leaves if t is not None]

    eager_out, eager_grads = run(fn)
    compiled_out, compiled_grads = run(torch.compile(fn, backend="aot_eager", fullgraph=True))
    assert len(eager_grads) == len(compiled_grads) > 0
    for a, b in zip(eager_out + eager_grads, compiled_out + compiled_grads):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)


@pytest.mark.parametrize("channels_last", [False, True])
def test_grid_sample_op(channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 9, generator=g).to(**F64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grid = (-1.2 + 2.4 * torch.rand(2, 5, 6, 2, generator=g)).to(**F64)
    torch.library.opcheck(gs._grid_sample_op, (x.requires_grad_(), grid.requires_grad_()))
    compare_compiled(lambda x, grid: gs.grid_sample(x * 2, grid, impl="triton") + 1, x, grid)


def _tps_case(b=2, t=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    target = (-0.8 + 1.6 * torch.rand(t, 2, generator=g)).to(**F64)
    coef = tg.tps_solve(target)
    control = (target + 0.1 * torch.randn(b, t, 2, generator=g, dtype=torch.float64).to(DEV))
    return control, target, coef


def test_tps_grid_op():
    control, target, coef = _tps_case()
    params = tg.tps_params(control, coef)
    torch.library.opcheck(tg._tps_grid_op, (params.requires_grad_(), target, 6, 7, torch.float64))
    compare_compiled(lambda c: tg.tps_grid(c * 1.5, target, coef, (6, 7), impl="triton"), control)


@pytest.mark.parametrize("channels_last", [False, True])
def test_tps_warp_op(channels_last):
    control, target, coef = _tps_case()
    g = torch.Generator().manual_seed(2)
    image = torch.randn(2, 3, 9, 8, generator=g).to(**F64)
    if channels_last:
        image = image.to(memory_format=torch.channels_last)
    params = tg.tps_params(control, coef)
    torch.library.opcheck(tw._tps_warp_op, (image.requires_grad_(), params.requires_grad_(), target, 5, 6))
    compare_compiled(lambda im, c: tw.tps_warp(im * 2, c, target, coef, (5, 6), impl="triton"), image, control)


@pytest.mark.parametrize("with_jacobian", [False, True])
def test_keypoint_head_op(with_jacobian):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, 7, generator=g).to(**F64)
    jmap = torch.randn(2, 3, 4, 5, 7, generator=g).to(**F64) if with_jacobian else None
    torch.library.opcheck(kh._keypoint_head_op, (logits.requires_grad_(),
                                                 jmap.requires_grad_() if with_jacobian else None, 1 / 0.1))

    def head(logits, jmap=None):
        value, jac = kh.keypoint_head(logits * 2, jmap, 0.1, impl="triton")
        return value, jac
    compare_compiled(head, logits, *([jmap] if with_jacobian else []))


dm = importlib.import_module("ostnet_fast.kernels.dense_motion")


@pytest.mark.parametrize("with_jacobian", [False, True])
def test_dense_motion_front_op(with_jacobian):
    g = torch.Generator().manual_seed(4)
    b, k, c, h, w = 2, 3, 3, 6, 5
    source = (0.6 + 0.4 * torch.randn(b, c, h, w, generator=g)).to(**F64)
    kp_s, kp_d = ((-0.9 + 1.8 * torch.rand(b, k, 2, generator=g)).to(**F64) for _ in range(2))
    jac = (torch.eye(2) + 0.4 * torch.randn(b, k, 2, 2, generator=g)).to(**F64) if with_jacobian else None
    args = [t.requires_grad_() if t is not None else None for t in (source, kp_s, kp_d, jac)]
    torch.library.opcheck(dm._front_op, (*args, 0.01))
    compare_compiled(lambda s, ks, kd, *j: dm.dense_motion_front(s * 2, ks, kd, j[0] if j else None, 0.01,
                                                                impl="triton"),
                     source, kp_s, kp_d, *([jac] if with_jacobian else []))


@pytest.mark.parametrize("feature_size, channels_last", [((6, 5), False), ((6, 5), True), ((9, 7), False)])
def test_dense_motion_combine_op(feature_size, channels_last):
    """Same size: one kernel (deformation + warp); another size: deformation, resize, warp."""
    g = torch.Generator().manual_seed(5)
    b, kp1, h, w, cf = 2, 4, 6, 5, 3
    logits = (-1.5 + 2.0 * torch.randn(b, kp1, h, w, generator=g)).to(**F64)
    motions = (-1.25 + 2.5 * torch.rand(b, kp1, h, w, 2, generator=g)).to(**F64)
    feature = (0.8 + 0.5 * torch.randn(b, cf, *feature_size, generator=g)).to(**F64)
    if channels_last:
        feature = feature.to(memory_format=torch.channels_last)
    occ = torch.rand(b, 1, h, w, generator=g).to(**F64)
    leaves = [t.requires_grad_() for t in (logits, motions, feature, occ)]
    if feature_size == (h, w):
        torch.library.opcheck(dm._combine_op, (*leaves[:2], None, *leaves[2:], True, True))
    else:  # the resize path's two calls: deformation only, then sampling at a grid
        grid = (-1.1 + 2.2 * torch.rand(b, *feature_size, 2, generator=g)).to(**F64).requires_grad_()
        occ_f = torch.rand(b, 1, *feature_size, generator=g).to(**F64).requires_grad_()
        torch.library.opcheck(dm._combine_op, (*leaves[:2], None, None, None, True, False))
        torch.library.opcheck(dm._combine_op, (None, None, grid, leaves[2], occ_f, False, True))
    compare_compiled(lambda lg, m, f, o: dm.dense_motion_combine(lg * 2, m, f, o, impl="triton"),
                     logits, motions, feature, occ)


zc = importlib.import_module("ostnet_fast.kernels.zconv")


def _conv_bn(cin, cout, seed):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
    norm = torch.nn.BatchNorm2d(cout)
    with torch.no_grad():
        conv.weight.copy_(0.4 * torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(0.3 + 0.2 * torch.randn(cout, generator=g))
        norm.weight.copy_(0.5 + torch.rand(cout, generator=g))
        norm.bias.copy_(-0.2 + 0.4 * torch.rand(cout, generator=g))
        norm.running_mean.copy_(0.3 * torch.randn(cout, generator=g))
        norm.running_var.copy_(0.5 + torch.rand(cout, generator=g))
    return conv.to(**F64), norm.to(**F64)


def test_zconv_epilogue_op():
    g = torch.Generator().manual_seed(6)
    conv_out = torch.randn(2, 4, 6, 5, generator=g).to(**F64).requires_grad_()
    e = torch.randn(2, 9, 4, generator=g).to(**F64).requires_grad_()
    conv, norm = _conv_bn(3, 4, 0)
    for training in (True, False):
        torch.library.opcheck(zc._zconv_op, (conv_out, e, conv.bias, norm.weight, norm.bias,
                                             norm.running_mean.clone(), norm.running_var.clone(),
                                             training, training, 0.1, 1e-5, True))


@pytest.mark.parametrize("mode, training, channels_last", [
    ("down", True, False), ("same", True, False), ("up", True, False), ("down", False, False),
    ("same", False, False), ("up", False, False), ("down", True, True), ("same", False, True)])
def test_zconv_block_compiled(mode, training, channels_last):
    """The whole block compiled (conv in the graph, the epilogue as the op) equals eager, running stats too."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 6, 8, generator=g).to(**F64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    zb = torch.randn(2, 3, generator=g).to(**F64)
    eager_mods, compiled_mods = _conv_bn(3, 4, 1), _conv_bn(3, 4, 1)
    for mods in (eager_mods, compiled_mods):
        for m in mods:
            m.train(training)
            if channels_last:
                m.to(memory_format=torch.channels_last)

    def block(mods):
        return lambda x, zb: zc.zconv_block(x * 2, zb, *mods, mode, impl="triton")

    outs = []
    for mods, compile_it in ((eager_mods, False), (compiled_mods, True)):
        fn = block(mods)
        if compile_it:
            fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
        xl, zl = x.clone().requires_grad_(), zb.clone().requires_grad_()
        out = fn(xl, zl)
        (out * (1 + torch.arange(out.numel(), device=out.device, dtype=out.dtype).view(out.shape) % 5)).sum().backward()
        outs.append([out, xl.grad, zl.grad, mods[0].weight.grad, mods[1].weight.grad, mods[1].running_mean,
                     mods[1].running_var])
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-10)


def test_auto_takes_the_reference_while_exporting(monkeypatch):
    """torch.export graphs run without Python (AOTInductor, ONNX): no torch.ops.ostnet.* in them."""
    from types import SimpleNamespace

    from ostnet_fast.kernels import _dispatch
    on_cuda = SimpleNamespace(is_cuda=True)  # what the dispatch reads of a CUDA tensor
    assert _dispatch.use_triton("grid_sample", "auto", on_cuda)
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)
    assert not _dispatch.use_triton("grid_sample", "auto", on_cuda)


class _Branch(torch.nn.Module):
    def forward(self, x):
        return x + 1 if _exporting() else x - 1


def _exporting():
    from ostnet_fast.kernels._dispatch import exporting
    return exporting()


def test_exporting_is_false_under_compile_and_true_under_export():
    """torch 2.11's dynamo folds torch.compiler.is_exporting() to True under torch.compile (pytorch#176347):
    the fused model then compiled to the reference. Our check must tell the two apart, in a compiled graph
    and in strict and non-strict torch.export."""
    x = torch.zeros(3)
    torch._dynamo.reset()
    assert torch.compile(_Branch(), backend="eager", fullgraph=True)(x)[0] == -1
    for strict in (False, True):
        program = torch.export.export(_Branch(), (x,), strict=strict)
        assert program.module()(x)[0] == 1, f"strict={strict}"
    assert not _exporting()


def test_reference_ops_sends_only_the_listed_ops_to_the_reference(monkeypatch):
    from types import SimpleNamespace

    from ostnet_fast.kernels import _dispatch
    on_cuda = SimpleNamespace(is_cuda=True)
    monkeypatch.setenv("OSTNET_REFERENCE_OPS", "zconv_block, tps_warp")
    assert not _dispatch.use_triton("zconv_block", "auto", on_cuda)
    assert not _dispatch.use_triton("tps_warp", "auto", on_cuda)
    assert _dispatch.use_triton("grid_sample", "auto", on_cuda)
    assert _dispatch.use_triton("zconv_block", "triton", on_cuda)  # a forced kernel stays forced
    monkeypatch.setenv("OSTNET_REFERENCE_OPS", "zconv")
    with pytest.raises(ValueError, match="unknown op.*zconv"):
        _dispatch.use_triton("zconv_block", "auto", on_cuda)


def test_forced_means_asked_for_by_name(monkeypatch):
    from ostnet_fast.kernels._dispatch import forced
    monkeypatch.delenv("OSTNET_IMPL", raising=False)
    assert forced("triton") and not forced("auto") and not forced("reference")
    monkeypatch.setenv("OSTNET_IMPL", "triton")
    assert forced("auto") and not forced("reference")


def test_ops_in_graph_counts_our_ops_in_the_compiled_graphs():
    """What bench/compiled_ops.py and the GPU training test read: ostnet ops by name, forward and backward."""
    from ostnet_fast.kernels._dispatch import ops_in_graph, recording_backend
    graphs = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 9, generator=g).to(**F64).requires_grad_()
    grid = (-1.2 + 2.4 * torch.rand(2, 5, 6, 2, generator=g)).to(**F64)
    fn = torch.compile(lambda x, grid: gs.grid_sample(x, grid, impl="triton") + gs.grid_sample(x, -grid, impl="triton"),
                       backend=recording_backend(graphs))
    fn(x, grid).sum().backward()
    seen = {kind: ops_in_graph(gm) for kind, gm in graphs}
    assert seen["forward"] == {"grid_sample": 2}
    assert seen["backward"] == {"grid_sample_backward": 2}
