import pytest
import torch

from peft_swift_ext.techniques.qgalore import QGaLoreAdamW, QGaLoreProjector, dequantize, quantize


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("seed", range(3))
def test_nearest_rounding_errs_by_at_most_half_a_step(bits, seed):
    values = torch.randn(64, 48, generator=torch.Generator().manual_seed(seed)) * (seed + 1)
    quantized = quantize(values, bits=bits, group_size=32)
    step = quantized.scales.repeat_interleave(32).view_as(values)
    error = (dequantize(quantized) - values).abs()
    assert (error <= step / 2 + 1e-6).all()
    assert quantized.codes.numel() == values.numel() * bits // 8  # INT4 packs two codes per byte


def test_stochastic_rounding_errs_by_less_than_a_step_and_is_unbiased():
    torch.manual_seed(0)
    values = torch.randn(4, 64)
    quantized = quantize(values, bits=4, group_size=64, stochastic=True)
    step = quantized.scales.repeat_interleave(64).view_as(values)
    assert ((dequantize(quantized) - values).abs() < step + 1e-6).all()
    mean = torch.stack([dequantize(quantize(values, 4, 64, stochastic=True)) for _ in range(2000)]).mean(0)
    # Nearest rounding has errors up to step/2; the mean of 2000 stochastic roundings is far closer.
    assert ((mean - values).abs() < step * 0.05).all()


def test_invalid_quantisation_is_refused():
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize(torch.zeros(8), bits=3, group_size=8)
    with pytest.raises(ValueError, match="groups of 5"):
        quantize(torch.zeros(8), group_size=5)


def _refresh_steps(projector, gradients):
    steps = []
    for step, grad in enumerate(gradients):
        before = projector.svd_count
        projector.project(grad, step)
        if projector.svd_count > before:
            steps.append(step)
    return steps


def test_stable_subspace_doubles_the_gap_once_the_queue_is_full():
    grad = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    projector = QGaLoreProjector(rank=2, update_proj_gap=2, cos_threshold=0.4, gamma_proj=2, queue_size=2)
    # SVDs at 0 and 2 fill nothing/one slot; at 4 the queue is full (mean 1.0) -> gap 4; at 8 -> 8; at 16 -> 16.
    assert _refresh_steps(projector, [grad] * 40) == [0, 2, 4, 8, 16, 32]


def test_changing_subspace_keeps_the_gap():
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(256, 128, generator=generator) for _ in range(20)]
    projector = QGaLoreProjector(rank=2, update_proj_gap=2, cos_threshold=0.4, queue_size=2)
    assert _refresh_steps(projector, gradients) == list(range(0, 20, 2))
    assert max(projector.similarities) < 0.4  # random directions in 128-d are far from each other


def test_projection_is_stored_as_int4():
    projector = QGaLoreProjector(rank=8, update_proj_gap=10, bits=4, group_size=64)
    grad = torch.randn(128, 64)
    low_rank = projector.project(grad, 0)
    assert low_rank.shape == (128, 8)
    assert projector.matrix.codes.dtype == torch.uint8 and projector.matrix.codes.numel() == 8 * 64 // 2
    exact = torch.linalg.svd(grad, full_matrices=False)[2][:8]
    assert (projector.projection(torch.float32) - exact).abs().max() < 0.1


def _toy_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(256, 64, generator=generator)
    target_weight = torch.randn(96, 64, generator=generator) / 8
    return inputs, inputs @ target_weight.t()


def _train(optimizer_factory, steps=60):
    inputs, targets = _toy_problem()
    torch.manual_seed(1)
    layer = torch.nn.Linear(64, 96, bias=False)
    group = {"params": [layer.weight], "rank": 16, "update_proj_gap": 10, "scale": 1.0, "proj_type": "std"}
    optimizer = optimizer_factory([group])
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(layer(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return layer.weight.detach(), losses


def test_unquantised_setting_equals_galore_torch():
    galore_torch = pytest.importorskip("galore_torch")
    reference, _ = _train(lambda groups: galore_torch.GaLoreAdamW(groups, lr=1e-2, no_deprecation_warning=True))
    weight, _ = _train(
        lambda groups: QGaLoreAdamW(groups, lr=1e-2, proj_bits=None, moment_dtype=torch.float32, cos_threshold=2.0)
    )
    torch.testing.assert_close(weight, reference)


def test_quantised_training_loss_stays_within_tolerance_of_galore():
    """Stated tolerance: final losses within 5% of the starting loss of each other, and both under half of it."""
    _, galore = _train(lambda g: QGaLoreAdamW(g, lr=1e-2, proj_bits=None, moment_dtype=torch.float32))
    _, qgalore = _train(lambda g: QGaLoreAdamW(g, lr=1e-2, proj_bits=4, weight_bits=8))
    assert galore[-1] < 0.5 * galore[0] and qgalore[-1] < 0.5 * qgalore[0]
    assert abs(qgalore[-1] - galore[-1]) <= 0.05 * galore[0]


def test_int8_weights_lie_on_their_quantisation_grid():
    weight, _ = _train(lambda g: QGaLoreAdamW(g, lr=1e-2, weight_bits=8, weight_group_size=64), steps=3)
    torch.testing.assert_close(dequantize(quantize(weight, 8, 64)), weight, atol=1e-6, rtol=0)


def test_state_is_smaller_than_galore_state_at_the_same_rank():
    def state_bytes(**options):
        layer = torch.nn.Linear(256, 256, bias=False)
        optimizer = QGaLoreAdamW([{"params": [layer.weight], "rank": 32}], **options)
        layer(torch.randn(4, 256)).sum().backward()
        optimizer.step()
        return optimizer.state_nbytes()

    galore = state_bytes(proj_bits=None, moment_dtype=torch.float32)
    assert galore == 3 * 256 * 32 * 4 + 256 * 4  # projection + two moments + leading vector, float32
    assert state_bytes() < 0.5 * galore


# --- weights really stored as INT8 -----------------------------------------------------------------------------


def _int8_linear(seed=0, bias=True, group_size=64):
    from peft_swift_ext.techniques.qgalore import Int8WeightLinear

    torch.manual_seed(seed)
    linear = torch.nn.Linear(64, 96, bias=bias)
    return linear, Int8WeightLinear(linear, group_size=group_size)


def test_int8_weight_takes_a_quarter_of_the_float_bytes():
    linear, layer = _int8_linear()
    assert layer.weight.dtype == torch.uint8 and layer.weight.shape == linear.weight.shape
    stored = sum(t.numel() * t.element_size() for t in (layer.weight, layer.weight_scales, layer.weight_zeros))
    assert stored == 96 * 64 * (1 + 8 / 64)  # one byte per value, float32 scale and zero per 64 values
    assert stored / (linear.weight.numel() * 4) < 0.3


def test_int8_forward_and_gradients_equal_the_dequantised_float_layer():
    _, layer = _int8_linear()
    weight = layer.dequantized_weight().clone().requires_grad_(True)
    assert (weight - dequantize(quantize(weight.detach(), 8, 64))).abs().max() < 1e-6  # codes are its grid
    inputs = torch.randn(3, 5, 64, requires_grad=True)
    reference_inputs = inputs.detach().clone().requires_grad_(True)
    out = layer(inputs)
    reference = torch.nn.functional.linear(reference_inputs, weight, layer.bias)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    layer.bias.grad = None
    reference.backward(grad)
    torch.testing.assert_close(layer.weight.float_grad, weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inputs.grad, reference_inputs.grad, atol=1e-5, rtol=1e-5)
    assert layer.weight.grad is None


def test_int8_weight_gets_its_gradient_even_when_nothing_else_needs_one():
    _, layer = _int8_linear(bias=False)
    layer(torch.randn(4, 64)).sum().backward()
    assert layer.weight.float_grad is not None and layer.weight.float_grad.abs().sum() > 0


def test_int8_stochastic_update_is_unbiased_and_nearest_rounding_loses_small_updates():
    _, layer = _int8_linear(seed=3)
    codes, scales, zeros = layer.weight.data.clone(), layer.weight_scales.clone(), layer.weight_zeros.clone()
    start = layer.dequantized_weight(torch.float32)
    step = scales.repeat_interleave(64).view_as(start)
    delta = 0.3 * step * torch.sign(torch.randn_like(start))  # a third of a step: nearest rounding drops it

    def updated(stochastic):
        layer.weight.data.copy_(codes)
        layer.weight_scales.copy_(scales)
        layer.weight_zeros.copy_(zeros)
        layer.apply_update_(delta, stochastic=stochastic)
        return layer.dequantized_weight(torch.float32)

    nearest = updated(False) - start
    mean = torch.stack([updated(True) for _ in range(1000)]).mean(0) - start
    # A grid recomputed from the new min/max may shift, so compare against the expected change on average.
    assert (mean - delta).abs().mean() < 0.05 * step.mean()
    assert (nearest - delta).abs().mean() > 0.2 * step.mean()


def test_qgalore_on_int8_stored_weights_trains_like_the_simulated_int8_weights():
    """Same seed, same arithmetic: the real INT8 weights follow the float-stored simulation closely."""
    inputs, targets = _toy_problem()

    def run(real_int8):
        from peft_swift_ext.techniques.qgalore import quantize_linear_weights

        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96, bias=False))
        if real_int8:
            weights = quantize_linear_weights(model, group_size=64)
        else:
            with torch.no_grad():
                model[0].weight.copy_(dequantize(quantize(model[0].weight, 8, 64)))
            weights = [model[0].weight]
        group = {"params": weights, "rank": 16, "update_proj_gap": 10, "scale": 1.0, "proj_type": "std"}
        optimizer = QGaLoreAdamW([group], lr=1e-2, weight_bits=8, weight_group_size=64)
        torch.manual_seed(2)
        losses = []
        for _ in range(40):
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return losses, model

    simulated, _ = run(False)
    real, model = run(True)
    assert model[0].weight.dtype == torch.uint8 and model[0].weight.float_grad is None
    assert real[-1] < 0.5 * real[0]
    assert abs(real[-1] - simulated[-1]) <= 0.05 * simulated[0]


def test_quantize_linear_weights_selects_like_peft_and_refuses_no_match():
    from peft_swift_ext.techniques.qgalore import Int8WeightLinear, quantize_linear_weights

    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(8, 8))
    model.add_module("v_proj", torch.nn.Linear(8, 8))
    weights = quantize_linear_weights(model, ["q_proj"], group_size=8)
    assert isinstance(model.q_proj, Int8WeightLinear) and type(model.v_proj) is torch.nn.Linear
    assert weights == [model.q_proj.weight]
    with pytest.raises(ValueError, match="selects no nn.Linear"):
        quantize_linear_weights(model, ["k_proj"])
