"""The small-map depthwise weight gradient (kp_plugin._depthwise) against
torch's own, and its use by fit()."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from kp_plugin import _depthwise
from kp_plugin._depthwise import depthwise_weight_grad, small_map_depthwise


def _torch_weight_grad(x, g, weight, stride, padding, dilation):
    return torch.ops.aten.convolution_backward(
        g, x, weight, None, list(stride), list(padding), list(dilation), False, [0, 0], x.shape[1],
        [False, True, False],
    )[1]


def _weight_grad_cases():
    settings = [((1, 1), (1, 1), (1, 1)), ((1, 1), (2, 2), (1, 1)), ((2, 2), (0, 0), (1, 1)),
                ((2, 1), (1, 2), (1, 1)), ((1, 1), (2, 2), (2, 2))]
    for size in [(1, 1), (2, 2), (3, 2), (4, 4), (5, 5), (2, 7)]:
        for kernel in [(3, 3), (5, 5), (3, 5)]:
            for stride, padding, dilation in settings:
                extent = [d * (k - 1) + 1 for d, k in zip(dilation, kernel)]
                if all(s + 2 * p >= e for s, p, e in zip(size, padding, extent)):  # at least one output
                    yield size, kernel, stride, padding, dilation


@pytest.mark.parametrize("size,kernel,stride,padding,dilation", list(_weight_grad_cases()))
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_weight_gradient_is_torchs(size, kernel, stride, padding, dilation, channels_last):
    h, w = size
    gen = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(6, 5, h, w, dtype=torch.float64, generator=gen)
    weight = torch.randn(5, 1, *kernel, dtype=torch.float64, generator=gen)
    y = F.conv2d(x, weight, None, stride, padding, dilation, 5)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    if channels_last:
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    got = depthwise_weight_grad(x, g, kernel, stride, padding, dilation)
    torch.testing.assert_close(got, _torch_weight_grad(x, g, weight, stride, padding, dilation))


def _conv_grads(conv, x, context):
    conv.zero_grad()
    x = x.detach().requires_grad_()
    with context():
        y = conv(x)
    y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
    return y.detach(), x.grad, conv.weight.grad.clone(), conv.bias.grad.clone(), y.grad_fn


@pytest.mark.parametrize("size,kernel,stride,padding", [(1, 5, 1, 2), (2, 3, 1, 1), (4, 5, 1, 2), (5, 5, 2, 0)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_inside_the_context_a_small_map_depthwise_conv_takes_the_path_with_torchs_values(
        size, kernel, stride, padding, memory_format):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(12, 12, kernel, stride, padding, groups=12).to(memory_format=memory_format)
    x = torch.randn(7, 12, size, size).to(memory_format=memory_format)
    outside = _conv_grads(conv, x, contextlib.nullcontext)
    inside = _conv_grads(conv, x, small_map_depthwise)
    assert type(inside[-1]).__name__ == "_SmallMapDepthwiseBackward"
    for a, b in zip(outside[:-1], inside[:-1]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["large map", "dense conv", "multiplier 2", "no grad", "frozen weight",
                                  "string padding", "integer input"])
def test_every_other_conv2d_call_passes_through_unchanged(case):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    x = torch.randn(2, 8, 2, 2)
    context = contextlib.nullcontext()
    if case == "large map":
        x = torch.randn(2, 8, 9, 9)
    elif case == "dense conv":
        conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    elif case == "multiplier 2":
        conv = torch.nn.Conv2d(8, 16, 3, padding=1, groups=8)
    elif case == "no grad":
        context = torch.no_grad()
    elif case == "frozen weight":
        conv.requires_grad_(False)
    elif case == "string padding":
        conv = torch.nn.Conv2d(8, 8, 3, padding="same", groups=8)
    with context, small_map_depthwise():
        if case == "integer input":  # torch's own error, not one of ours
            with pytest.raises(RuntimeError):
                conv(x.to(torch.int64))
            return
        y = conv(x)
    assert y.grad_fn is None or type(y.grad_fn).__name__ != "_SmallMapDepthwiseBackward"
    torch.testing.assert_close(y, conv(x))


def test_double_precision_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: _depthwise._SmallMapDepthwise.apply(x, w, b, (1, 1), (1, 1), (1, 1)), (x, weight, bias))


def _tiny_efficientnet():
    timm = pytest.importorskip("timm")
    return timm.create_model("tf_efficientnet_lite0", num_classes=3, pretrained=False)


@pytest.mark.parametrize("channels_last", [True, False])
def test_fit_takes_the_path_on_the_cpu_and_trains_as_without_it(monkeypatch, channels_last):
    from kp_plugin import SecretKey, wrap_model
    from kp_plugin.data import TensorImageDataset
    from kp_plugin.objectives import ProtectionObjective
    from kp_plugin.train import TrainConfig, fit

    calls = []
    original = _depthwise._SmallMapDepthwise.apply
    monkeypatch.setattr(_depthwise._SmallMapDepthwise, "apply",
                        lambda *args: calls.append(tuple(args[0].shape)) or original(*args))
    key = SecretKey(bytes(range(32)), block_size=4)
    torch.manual_seed(0)
    base = wrap_model(_tiny_efficientnet(), key, mean=(0.5,) * 3, std=(0.5,) * 3)
    data = TensorImageDataset(torch.rand(16, 3, 32, 32), torch.arange(16) % 3, classes=["a", "b", "c"])
    weights = {}
    for small_maps in (False, True):
        model = wrap_model(_tiny_efficientnet(), key, mean=(0.5,) * 3, std=(0.5,) * 3)
        model.load_state_dict(base.state_dict())
        config = TrainConfig(epochs=1, batch_size=8, augment=False, channels_last=channels_last,
                             small_map_depthwise=small_maps, objective=ProtectionObjective())
        fit(model, data, config=config, progress=False)
        weights[small_maps] = model.state_dict()
        assert bool(calls) == small_maps  # the 32x32 input ends on 1x1 maps under 3x3 / 5x5 kernels
    assert (8, 1152, 1, 1) in calls
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_a_compiled_model_runs_inside_the_context_with_torchs_values():
    # KeyedTrainer steps a model compiled by TrainingArguments(torch_compile=True)
    # inside the context: the compiled code keeps torch's own convolution.
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 5, padding=2, groups=8), torch.nn.ReLU())
    x = torch.randn(4, 8, 2, 2)
    reference = conv(x)
    reference.sum().backward()
    grad = conv[0].weight.grad.clone()
    conv.zero_grad()
    with small_map_depthwise():
        y = torch.compile(conv, backend="eager")(x)
    y.sum().backward()
    torch.testing.assert_close(y, reference)
    torch.testing.assert_close(conv[0].weight.grad, grad)
