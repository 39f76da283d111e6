"""Checks of the Lyapunov engine against known spectra and an independent autograd reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import lepredict
from lepredict.lyapunov import LOG_FLOOR, LyapunovSpectrum, rnn_state_size, rnn_step

F64 = torch.float64
ARCHS = {"rnn_tanh": (nn.RNN, {}), "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
         "gru": (nn.GRU, {}), "lstm": (nn.LSTM, {})}


def make(arch, input_size=3, hidden=6, layers=2, bias=True, batch_first=True, seed=0, scale=1.0):
    torch.manual_seed(seed)
    cls, kw = ARCHS[arch]
    m = cls(input_size, hidden, num_layers=layers, bias=bias, batch_first=batch_first, **kw).double()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(scale)
    return m


def all_active(m):
    """Non-negative weights and positive biases keep every ReLU unit active on non-negative
    inputs. An inactive unit makes J_t exactly singular: the directions it annihilates get the
    floored log|R_ii|, and the orientation QR then picks for them is set by rounding, so only
    the leading exponents of such a network are comparable between two implementations."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.abs_().mul_(0.2 if "weight_hh" in name else 1.0).add_(1.0 if "bias" in name else 0.0)
    return m


def flat_h0(m, h0, B):
    """The engine's flat state (B, n) for the module-convention h0."""
    if isinstance(m, nn.LSTM):
        h, c = h0
        return torch.stack([h, c], 2).transpose(0, 1).reshape(B, -1)
    return h0.transpose(0, 1).reshape(B, -1)


def mean_log_abs_det(m, x, warmup):
    """Mean over steps > warmup of log|det J_t| along the trajectory, J_t by autograd."""
    step = rnn_step(m)
    B, T, _ = x.shape
    s = torch.zeros(B, rnn_state_size(m), dtype=F64)
    total = torch.zeros(B, dtype=F64)
    for t in range(T):
        jac = torch.func.vmap(torch.func.jacrev(lambda si, xi: step(si[None], xi[None])[0]))(s, x[:, t])
        if t >= warmup:
            total += torch.linalg.slogdet(jac).logabsdet
        with torch.no_grad():
            s = step(s, x[:, t])
    return total / (T - warmup)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_fast_path_equals_torch_func_path(arch, layers):
    m = make(arch, layers=layers, seed=layers, scale=1.5)
    x = torch.randn(5, 40, 3, dtype=F64)
    if arch == "rnn_relu":
        all_active(m)
        x = x.abs()
    fast = lepredict.lyapunov_spectrum(m, x, warmup=7)
    ref = lepredict.lyapunov_spectrum_map(rnn_step(m), torch.zeros(5, fast.n, dtype=F64), x, warmup=7)
    assert fast.exponents.shape == (5, rnn_state_size(m))
    torch.testing.assert_close(fast.exponents, ref.exponents, rtol=0, atol=1e-9)
    # Each row sorted in descending order.
    assert (fast.exponents.diff(dim=-1) <= 0).all()


def test_relu_with_inactive_units_leading_exponent_matches_reference():
    m = make("rnn_relu", layers=2, seed=5, scale=1.5)
    x = torch.randn(5, 40, 3, dtype=F64)
    fast = lepredict.lyapunov_spectrum(m, x, warmup=7)
    ref = lepredict.lyapunov_spectrum_map(rnn_step(m), torch.zeros(5, fast.n, dtype=F64), x, warmup=7)
    assert (fast.floored > 0).all()  # the case this test is about
    assert torch.isfinite(fast.exponents).all()
    torch.testing.assert_close(fast.exponents[:, 0], ref.exponents[:, 0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("arch", ["rnn_tanh", "gru", "lstm"])
def test_no_bias_seq_first_h0_partial_k_and_sparse_qr_match_reference(arch):
    m = make(arch, layers=2, bias=False, batch_first=False, seed=3, scale=1.3)
    B, T = 4, 30
    x = torch.randn(T, B, 3, dtype=F64)
    h = torch.randn(2, B, 6, dtype=F64)
    h0 = (h, torch.randn(2, B, 6, dtype=F64)) if arch == "lstm" else h
    fast = lepredict.lyapunov_spectrum(m, x, h0=h0, k=4, warmup=5, reorth_every=3)
    m.batch_first = True  # the reference step feeds (B, 1, d) inputs
    ref = lepredict.lyapunov_spectrum_map(rnn_step(m), flat_h0(m, h0, B), x.transpose(0, 1), k=4,
                                          warmup=5, reorth_every=3)
    assert fast.exponents.shape == (B, 4)
    torch.testing.assert_close(fast.exponents, ref.exponents, rtol=0, atol=1e-9)


def test_reorth_every_does_not_change_the_result_in_exact_arithmetic():
    m = make("gru", layers=2, seed=1)
    x = torch.randn(3, 60, 3, dtype=F64)
    a = lepredict.lyapunov_spectrum(m, x, warmup=10)
    b = lepredict.lyapunov_spectrum(m, x, warmup=10, reorth_every=4)
    torch.testing.assert_close(a.exponents, b.exponents, rtol=0, atol=1e-8)


def test_hidden_only_lstm_holds_c_fixed():
    """lstm_state='hidden' = Jacobian of h_t wrt h_{t-1} with c_{t-1} an input, by autograd."""
    torch.manual_seed(0)
    B, L, N, T = 4, 2, 5, 40
    m = nn.LSTM(3, N, num_layers=L, batch_first=True).double()
    x = torch.randn(B, T, 3, dtype=F64)
    h = torch.zeros(L, B, N, dtype=F64)
    c = torch.zeros_like(h)
    cs = []
    with torch.no_grad():
        for t in range(T):
            cs.append(c.transpose(0, 1).reshape(B, -1))
            _, (h, c) = m(x[:, t:t + 1], (h, c))
    drive = torch.cat([x, torch.stack(cs, 1)], -1)

    def step(hf, xc):
        hh = hf.view(-1, L, N).transpose(0, 1).contiguous()
        cc = xc[:, 3:].reshape(-1, L, N).transpose(0, 1).contiguous()
        _, (hn, _) = m(xc[:, None, :3], (hh, cc))
        return hn.transpose(0, 1).reshape(hf.shape[0], -1)

    fast = lepredict.lyapunov_spectrum(m, x, lstm_state="hidden", warmup=5)
    ref = lepredict.lyapunov_spectrum_map(step, torch.zeros(B, L * N, dtype=F64), drive, warmup=5)
    assert fast.n == L * N
    torch.testing.assert_close(fast.exponents, ref.exponents, rtol=0, atol=1e-9)
    full = lepredict.lyapunov_spectrum(m, x, warmup=5)
    assert full.n == 2 * L * N


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sum_rule(arch):
    m = make(arch, layers=2, seed=7, scale=2.0)
    if arch == "rnn_relu":
        all_active(m)  # log|det J_t| is -inf where a unit is inactive
    x = torch.randn(3, 25, 3, dtype=F64)
    if arch == "rnn_relu":
        x = x.abs()
    spec = lepredict.lyapunov_spectrum(m, x, warmup=4)
    expected = mean_log_abs_det(m, x, warmup=4)
    torch.testing.assert_close(spec.exponents.sum(-1), expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("arch, lstm_state", [(a, "full") for a in ARCHS] + [("lstm", "hidden")])
def test_exponent_sum_of_a_partial_spectrum_is_the_full_spectrums_sum(arch, lstm_state):
    """With k < n the sum comes from log|det J_t| (analytic for the RNN and the LSTM's (h, c)
    state, an LU otherwise); it must equal the full spectrum's sum to rounding."""
    m = make(arch, layers=2, seed=3, scale=2.0)
    x = torch.randn(3, 30, 3, dtype=F64)
    if arch == "rnn_relu":
        all_active(m)  # an inactive unit's direction is floored, differently by QR and by det
        x = x.abs()
    full = lepredict.lyapunov_spectrum(m, x, warmup=5, lstm_state=lstm_state)
    part = lepredict.lyapunov_spectrum(m, x, warmup=5, k=3, exponent_sum=True,
                                       lstm_state=lstm_state)
    torch.testing.assert_close(full.exponent_sum, full.exponents.sum(-1))
    torch.testing.assert_close(part.exponent_sum, full.exponent_sum, rtol=1e-9, atol=1e-9)
    assert lepredict.lyapunov_spectrum(m, x, k=3).exponent_sum is None  # not asked for


def test_map_exponent_sum_of_a_partial_spectrum():
    m = make("gru", layers=1, seed=4, scale=2.0)
    x = torch.randn(2, 20, 3, dtype=F64)
    full = lepredict.lyapunov_spectrum_map(rnn_step(m), torch.zeros(2, 6, dtype=F64), x)
    part = lepredict.lyapunov_spectrum_map(rnn_step(m), torch.zeros(2, 6, dtype=F64), x, k=2,
                                           exponent_sum=True)
    torch.testing.assert_close(part.exponent_sum, full.exponent_sum, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch, scale, layers", [
    ("rnn_tanh", 1.0, 1), ("rnn_tanh", 3.0, 1), ("gru", 1.0, 1), ("gru", 3.0, 2),
    ("lstm", 1.0, 1), ("lstm", 3.0, 1)])
def test_auto_reorthonormalisation_keeps_the_accuracy(arch, scale, layers):
    """reorth_every='auto' against a QR every step on the same trajectories: every exponent
    above -20 within 2e-3, in float64 and in float32. (Float32 against float64 is not the
    scheme's error: a chaotic network's float32 trajectory leaves the float64 one.)"""
    m = make(arch, input_size=1, hidden=48, layers=layers, seed=1, scale=scale).float()
    x = torch.randn(4, 200, 1)
    for dtype in (F64, torch.float32):
        every = lepredict.lyapunov_spectrum(m, x, warmup=20, dtype=dtype).exponents.double()
        auto = lepredict.lyapunov_spectrum(m, x, warmup=20, dtype=dtype,
                                           reorth_every="auto").exponents.double()
        kept = every > -20
        error = (auto - every)[kept].abs().max().item()
        assert error < 2e-3, (dtype, error)


@pytest.mark.parametrize("arch, scale, layers", [
    ("rnn_tanh", 1.0, 1), ("rnn_tanh", 3.0, 2), ("gru", 1.0, 2), ("gru", 3.0, 1),
    ("lstm", 1.0, 2), ("lstm", 3.0, 1)])
def test_the_default_measurement_matches_a_qr_every_step(arch, scale, layers):
    """What measure_and_report and the sweep measure (16 leading exponents and the sum, QRs on
    the MEASURED_REORTH schedule, a probe of 8 x 48 steps in float32) is the QR-every-step
    measurement the predictors were fitted on, within 2e-3, at default and saturated scales."""
    from lepredict.train import MEASURED_REORTH, MEASURED_SUM_EVERY, measured_spectrum

    assert MEASURED_REORTH == "auto"
    m = make(arch, input_size=5, hidden=64, layers=layers, seed=2, scale=scale).float()
    x = torch.randn(8, 48, 5)
    got = measured_spectrum(m, x, warmup=6)
    every = lepredict.lyapunov_spectrum(m, x, warmup=6, k=16, exponent_sum=True)
    assert got.exponents.shape == (8, 16) and not bool(got.diverged.any())
    assert (got.exponents - every.exponents).abs().max().item() < 2e-3
    if arch == "gru":  # the sum's LUs on every MEASURED_SUM_EVERY-th step: what the record
        # holds (the mean over the probe's trajectories) within 5e-3 per exponent
        assert got.sum_every == MEASURED_SUM_EVERY > 1
        n = m.hidden_size * layers
        error = (got.exponent_sum.mean() - every.exponent_sum.mean()).abs().item() / n
        assert error < 5e-3, error
    else:  # in closed form: every step, exactly
        assert got.sum_every == 1
        torch.testing.assert_close(got.exponent_sum, every.exponent_sum, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch, lstm_state", [("gru", "full"), ("lstm", "hidden")])
def test_sum_every_averages_the_determinants_of_every_nth_step(arch, lstm_state, monkeypatch):
    """sum_every=s averages log|det J_t| over the averaged steps warmup+1, warmup+1+s, ...,
    across the two-pass engine's windows, for stacked networks and for the map path alike. Each
    step's determinant is the every-step sum of a run whose only averaged step is that one (the
    every-step sum is checked against the full spectrum's above)."""
    nets = [make(arch, hidden=5, layers=2, seed=s, scale=2.0) for s in (0, 1)]
    x = torch.randn(3, 30, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    kw = dict(k=2, exponent_sum=True, lstm_state=lstm_state)
    per_step = [torch.stack([lepredict.lyapunov_spectrum(m, x[:, :t + 1], warmup=t, **kw)
                             .exponent_sum for t in range(5, 30)]) for m in nets]
    for every in (1, 3, 4):
        specs = lepredict.lyapunov_spectra(nets, x, warmup=5, sum_every=every, **kw)
        for m, spec, steps in zip(nets, specs, per_step):
            expected = steps[::every].mean(0)
            torch.testing.assert_close(spec.exponent_sum, expected, rtol=1e-9, atol=1e-9)
            assert spec.sum_every == every
            if arch == "gru" and every == 4 and m is nets[0]:  # the map path: slow, once
                mapped = lepredict.lyapunov_spectrum_map(rnn_step(m), torch.zeros(3, 10, dtype=F64),
                                                         x, k=2, warmup=5, exponent_sum=True,
                                                         sum_every=every)
                torch.testing.assert_close(mapped.exponent_sum, expected, rtol=1e-9, atol=1e-9)
    # Windows of 7 steps: the stride runs on across them.
    monkeypatch.setattr(lepredict.lyapunov, "TWO_PASS_WINDOW_BYTES", 7 * 3 * 2 * 16 * 5 * 8)
    windowed = lepredict.lyapunov_spectrum(nets[0], x, warmup=5, sum_every=4, **kw)
    torch.testing.assert_close(windowed.exponent_sum, specs[0].exponent_sum, rtol=0, atol=1e-12)


def test_sum_every_leaves_closed_form_sums_and_refuses_nonsense():
    m = make("lstm", hidden=5, layers=1, seed=0)
    x = torch.randn(2, 20, 3, dtype=F64)
    strided = lepredict.lyapunov_spectrum(m, x, k=2, warmup=3, exponent_sum=True, sum_every=4)
    full = lepredict.lyapunov_spectrum(m, x, warmup=3)
    assert strided.sum_every == 1  # the (h, c) determinant costs nothing: every step
    torch.testing.assert_close(strided.exponent_sum, full.exponent_sum, rtol=1e-9, atol=1e-9)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="sum_every must be a positive int"):
            lepredict.lyapunov_spectrum(m, x, k=2, exponent_sum=True, sum_every=bad)


@pytest.mark.parametrize("arch", ["rnn_tanh", "gru", "lstm"])
def test_long_sequences_run_in_windows_with_the_same_result(arch, monkeypatch):
    """The two-pass engine keeps a window of steps at a time; windows of 7 steps (the warm-up
    ending inside one, QRs on the auto schedule crossing them, stacked networks) give what one
    window gives."""
    nets = [make(arch, hidden=12, layers=2, seed=s) for s in (0, 1)]
    x = torch.randn(3, 40, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    kw = dict(k=4, warmup=10, exponent_sum=True, reorth_every="auto")
    whole = lepredict.lyapunov_spectra(nets, x, **kw)
    step_bytes = 3 * 2 * 2 * 16 * 12 * 8  # rows x layers x 16 values x N x 8 bytes, as sized
    monkeypatch.setattr(lepredict.lyapunov, "TWO_PASS_WINDOW_BYTES", 7 * step_bytes)
    windowed = lepredict.lyapunov_spectra(nets, x, **kw)
    for a, b in zip(whole, windowed):
        torch.testing.assert_close(a.exponents, b.exponents, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.exponent_sum, b.exponent_sum, rtol=0, atol=1e-12)


def test_auto_reorthonormalisation_skips_qrs_where_conditioning_allows(monkeypatch):
    calls = []
    qr = lepredict.lyapunov._householder_qr
    monkeypatch.setattr(lepredict.lyapunov, "_householder_qr", lambda a: calls.append(1) or qr(a))
    torch.manual_seed(0)
    gru = nn.GRU(1, 32, batch_first=True)  # exponents within about 1 of each other
    lepredict.lyapunov_spectrum(gru, torch.randn(2, 100, 1), reorth_every="auto")
    assert 0 < len(calls) < 40
    calls.clear()
    rnn = make("rnn_tanh", layers=1, scale=6.0).float()  # saturated: exponents far apart
    lepredict.lyapunov_spectrum(rnn, torch.randn(2, 100, 3), reorth_every="auto")
    assert len(calls) >= 90


def test_linear_map_gives_log_abs_eigenvalues():
    g = torch.Generator().manual_seed(0)
    eig = torch.tensor([1.3, -0.9, 0.6, 0.35, -0.1], dtype=F64)
    p = torch.randn(5, 5, generator=g, dtype=F64)
    a = p @ torch.diag(eig) @ torch.linalg.inv(p)
    # The origin is a fixed point: the state stays finite although |1.3|^T would overflow.
    spec = lepredict.lyapunov_spectrum_map(lambda h: h @ a.T, torch.zeros(3, 5, dtype=F64),
                                           steps=3000, warmup=100, reorth_every=2)
    expected = eig.abs().log().sort(descending=True).values
    torch.testing.assert_close(spec.mean, expected, rtol=0, atol=2e-3)


def test_linear_driven_map_with_inputs():
    a = torch.tensor([[0.9, 1.0], [0.0, -0.3]], dtype=F64)
    x = torch.randn(2, 2000, 2, dtype=F64)
    spec = lepredict.lyapunov_spectrum_map(lambda h, u: h @ a.T + u, torch.zeros(2, 2, dtype=F64), x)
    assert not spec.diverged.any()
    torch.testing.assert_close(spec.mean, torch.tensor([math.log(0.9), math.log(0.3)], dtype=F64),
                               rtol=0, atol=2e-3)


def henon(h):
    x, y = h[:, 0], h[:, 1]
    return torch.stack([1 - 1.4 * x**2 + y, 0.3 * x], -1)


def test_henon():
    g = torch.Generator().manual_seed(1)
    h0 = 0.1 + 0.01 * torch.randn(256, 2, generator=g, dtype=F64)
    spec = lepredict.lyapunov_spectrum_map(henon, h0, steps=5000, warmup=200)
    assert not spec.diverged.any()
    assert abs(spec.mean[0].item() - 0.4192) < 2e-3
    assert abs(spec.mean[1].item() - (-1.6232)) < 2e-3
    # Sum rule: det J = -0.3 everywhere.
    torch.testing.assert_close(spec.exponents.sum(-1), torch.full((256,), math.log(0.3), dtype=F64))


def lorenz_rk4(dt=0.01, sigma=10.0, rho=28.0, beta=8.0 / 3.0):
    def f(s):
        x, y, z = s.unbind(-1)
        return torch.stack([sigma * (y - x), x * (rho - z) - y, x * y - beta * z], -1)

    def step(s):
        k1 = f(s)
        k2 = f(s + dt / 2 * k1)
        k3 = f(s + dt / 2 * k2)
        k4 = f(s + dt * k3)
        return s + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    return step


def _lorenz(B, steps, warmup):
    g = torch.Generator().manual_seed(0)
    h0 = torch.tensor([1.0, 1.0, 20.0], dtype=F64) + torch.randn(B, 3, generator=g, dtype=F64)
    spec = lepredict.lyapunov_spectrum_map(lorenz_rk4(), h0, steps=steps, warmup=warmup)
    return spec.mean / 0.01


def test_lorenz():
    lam = _lorenz(B=32, steps=5000, warmup=500)
    assert abs(lam[0].item() - 0.906) < 0.05
    assert abs(lam[1].item()) < 0.02
    assert abs(lam[2].item() - (-14.57)) < 0.05


@pytest.mark.slow
def test_lorenz_long():
    lam = _lorenz(B=64, steps=40000, warmup=1000)
    assert abs(lam[0].item() - 0.906) < 0.01
    assert abs(lam[1].item()) < 0.005
    assert abs(lam[2].item() - (-14.57)) < 0.01


@pytest.mark.parametrize("g", [0.5, 0.8])
def test_circular_law_random_tanh_network(g):
    """Below g = 1 the network settles on its fixed point 0, where J = W; the eigenvalues of a
    Gaussian W with variance g^2/N fill the disc of radius g (circular law), so the largest
    exponent is ln g and the mean is ln g - 1/2 as N grows."""
    torch.manual_seed(0)
    N = 256
    rnn = nn.RNN(1, N, bias=False, batch_first=True).double()
    with torch.no_grad():
        rnn.weight_hh_l0.normal_(0, g / math.sqrt(N))
    h0 = 0.5 * torch.randn(1, 2, N, dtype=F64)
    spec = lepredict.lyapunov_spectrum(rnn, torch.zeros(2, 600, 1, dtype=F64), h0=h0, warmup=200)
    # At the fixed point the spectrum is exactly log|eigenvalues of W|.
    log_eig = torch.linalg.eigvals(rnn.weight_hh_l0.detach()).abs().log().sort(descending=True).values
    torch.testing.assert_close(spec.mean[:3], log_eig[:3], rtol=0, atol=1e-3)
    assert abs(spec.mean.mean().item() - log_eig.mean().item()) < 1e-6
    # Circular law. The spectral radius of a finite Ginibre matrix exceeds g by about
    # g * sqrt(ln N / 4N) (0.074 g at N = 256), hence the one-sided band on the largest exponent.
    assert -0.02 < spec.mean[0].item() - math.log(g) < 0.12
    assert abs(spec.mean.mean().item() - (math.log(g) - 0.5)) < 0.01


def test_float32_runs_and_dtype_float64_upgrades():
    torch.manual_seed(0)
    m = nn.GRU(2, 8, batch_first=True)
    x = torch.randn(4, 50, 2)
    s32 = lepredict.lyapunov_spectrum(m, x)
    s64 = lepredict.lyapunov_spectrum(m, x, dtype=F64)
    assert s32.exponents.dtype == torch.float32
    assert s64.exponents.dtype == F64
    torch.testing.assert_close(s32.exponents.double(), s64.exponents, rtol=0, atol=1e-3)
    assert s32.mean.shape == (8,) and s32.std.shape == (8,)
    assert (s32.std >= 0).all()


def test_saturated_units_are_floored_not_minus_inf():
    """tanh(100) is exactly 1 in float32, so every derivative is 0 and J_t = 0."""
    m = nn.RNN(1, 4, batch_first=True)
    with torch.no_grad():
        m.bias_ih_l0.fill_(100.0)
    spec = lepredict.lyapunov_spectrum(m, torch.zeros(2, 20, 1))
    assert torch.isfinite(spec.exponents).all()
    torch.testing.assert_close(spec.exponents, torch.full((2, 4), LOG_FLOOR[torch.float32]))
    assert (spec.floored == 4 * 20).all()
    assert not spec.diverged.any()


def test_partially_saturated_network_stays_finite():
    torch.manual_seed(0)
    m = nn.LSTM(2, 6, batch_first=True)
    with torch.no_grad():
        m.bias_ih_l0[:3].fill_(200.0)  # input gate of half the units fully open
        m.bias_ih_l0[12:15].fill_(-200.0)  # their candidate fully saturated
    spec = lepredict.lyapunov_spectrum(m, torch.randn(3, 40, 2))
    assert torch.isfinite(spec.exponents).all()
    assert torch.isfinite(spec.mean).all()


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_overflowing_trajectory_is_marked_diverged_others_finite(device):
    """Unit 0 of a ReLU net grows like 1.5^t when driven positively and overflows float32. On
    CUDA this runs the graph replays, the Gram QR and its Householder fallback for the
    non-finite rows."""
    m = nn.RNN(2, 2, nonlinearity="relu", bias=False, batch_first=True)
    with torch.no_grad():
        m.weight_hh_l0.copy_(torch.diag(torch.tensor([1.5, 0.5])))
        m.weight_ih_l0.copy_(torch.eye(2))
    x = torch.ones(3, 400, 2)
    x[1, :, 0] = -1.0  # unit 0 stays at 0 here
    spec = lepredict.lyapunov_spectrum(m.to(device), x.to(device))
    spec = LyapunovSpectrum(*(v.cpu() if torch.is_tensor(v) else v
                              for v in dataclasses.astuple(spec)))
    assert spec.diverged.tolist() == [True, False, True]
    assert spec.floored[0] == 0 and spec.floored[2] == 0  # no count for a diverged row
    assert torch.isnan(spec.exponents[0]).all()
    assert torch.isfinite(spec.exponents[1]).all()
    assert abs(spec.exponents[1, 0].item() - math.log(0.5)) < 1e-5
    torch.testing.assert_close(spec.mean, spec.exponents[1])
    torch.testing.assert_close(spec.std, torch.zeros(2))


@CUDA
@pytest.mark.parametrize("arch,scale", [("rnn_tanh", 1.0), ("gru", 1.0), ("lstm", 1.0),
                                        ("rnn_tanh", 8.0), ("lstm", 8.0)])
@pytest.mark.parametrize("k", [None, 16], ids=["full", "top16+sum"])
def test_cuda_graph_replays_match_the_eager_loop(arch, scale, k, monkeypatch):
    """Also the default measurement's partial spectrum, whose per-step log-determinant (an LU
    for the GRU) is captured in the graph."""
    m = make(arch, hidden=32, layers=2, seed=1, scale=scale).float().cuda()
    x = torch.randn(8, 60, 3, device="cuda")
    graphed = lepredict.lyapunov_spectrum(m, x, warmup=5, k=k, exponent_sum=True)
    monkeypatch.setattr(lepredict.lyapunov, "CUDA_GRAPH_MIN_STEPS", 10**9)
    eager = lepredict.lyapunov_spectrum(m, x, warmup=5, k=k, exponent_sum=True)
    assert torch.equal(graphed.diverged, eager.diverged)
    assert torch.equal(graphed.floored, eager.floored)
    torch.testing.assert_close(graphed.exponents, eager.exponents, rtol=0, atol=1e-4,
                               equal_nan=True)
    torch.testing.assert_close(graphed.exponent_sum, eager.exponent_sum, rtol=0, atol=1e-4,
                               equal_nan=True)


@pytest.mark.parametrize("arch", ["rnn_tanh", "gru", "lstm"])
def test_the_cuda_graphs_step_function_matches_the_two_pass_loop_on_a_cpu(arch):
    """What the CUDA graph captures (one whole step: state, tangent rows, log-determinant) run
    eagerly in float64, so CI, which has no GPU, checks its arithmetic against the CPU loop."""
    from lepredict import lyapunov as ly

    m = make(arch, hidden=5, layers=2, seed=3)
    x = torch.randn(2, 20, 3, dtype=F64)
    cell, N, layers, per_layer = ly._module_info(m, "full")
    ops = ly._CELLS[cell if cell != "lstm" else "lstm_full"]
    weights = ly._weights(m, F64)
    n = layers * per_layer
    acc = ly._Accumulator(2, n, n, 20, 4, 1, F64, torch.device("cpu"))
    state = ly._initial_state(m, None, 2, cell, F64, torch.device("cpu"))
    qt = acc.basis0.clone()
    gi0 = ly._xwt_all(ly._layer_bias(ops, weights[0][2]), x, weights[0][0])
    step = ly._make_step(ops)
    constants = ly._logdet_constants(cell if cell != "lstm" else "lstm_full", weights, N, 2)
    logdet = torch.zeros(2, dtype=F64)
    for t in range(1, 21):
        state, pre, step_logdet = step(weights, state, qt, gi0[:, t - 1], N, constants)
        logdet += step_logdet if t > 4 else 0.0
        qt = acc.qr(t, pre)
    stepped = acc.result(F64, n, False)
    looped = lepredict.lyapunov_spectrum(m, x, warmup=4, reorth_every=1)
    torch.testing.assert_close(stepped.exponents, looped.exponents, rtol=0, atol=1e-10)
    torch.testing.assert_close(logdet / 16, looped.exponents.sum(-1), rtol=0, atol=1e-10)


def test_all_diverged_gives_nan_summary_without_error():
    spec = lepredict.lyapunov_spectrum_map(lambda h: 1e30 * h, torch.ones(2, 2), steps=5)
    assert spec.diverged.all()
    assert torch.isnan(spec.mean).all()


def test_map_diverging_rows_do_not_contaminate_others():
    scale = torch.tensor([[10.0], [0.5]])
    spec = lepredict.lyapunov_spectrum_map(lambda h, s: h * s, torch.ones(2, 1), scale[:, None].expand(2, 100, 1))
    assert spec.diverged.tolist() == [True, False]
    assert abs(spec.exponents[1, 0].item() - math.log(0.5)) < 1e-5


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x: lepredict.lyapunov_spectrum(nn.Linear(3, 3), x), "Unsupported module"),
        (lambda m, x: lepredict.lyapunov_spectrum(nn.LSTMCell(3, 4), x), "Unsupported module"),
        (lambda m, x: lepredict.lyapunov_spectrum(nn.GRU(3, 4, bidirectional=True), x), "bidirectional"),
        (lambda m, x: lepredict.lyapunov_spectrum(nn.LSTM(3, 4, proj_size=2), x), "proj_size"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x[0]), "3-D"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x[..., :2]), "input_size=3"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x, k=13), "k cannot exceed"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x, k=0), "k must be"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x, warmup=10), "warmup must be smaller"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x, warmup=-1), "warmup must be"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x, reorth_every=0), "reorth_every"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x, reorth_every="often"), "or 'auto'"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x, h0=torch.zeros(1, 2, 6)), "h0 has shape"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x, lstm_state="cell"), "lstm_state"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x, dtype=torch.int64), "dtype"),
        (lambda m, x: lepredict.lyapunov_spectrum(nn.Sequential(nn.Linear(3, 3), m), x),
         r"pass the recurrent module it holds \(\.1\)"),
        (lambda m, x: lepredict.lyapunov_spectrum(nn.GRU(3, 4).half(), x),
         r"pass dtype=torch\.float32"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x.numpy()), r"torch\.as_tensor"),
        (lambda m, x: lepredict.lyapunov_spectrum(m.to("meta"), x), "meta device"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x.to("meta")), "meta device"),
        (lambda m, x: lepredict.lyapunov_spectrum(m, x[:, :0]), "empty"),
    ],
)
def test_bad_input_raises_clear_value_error(call, match):
    m = nn.GRU(3, 6, num_layers=2, batch_first=True)
    x = torch.randn(2, 10, 3)
    with pytest.raises(ValueError, match=match):
        call(m, x)


def test_lstm_h0_must_be_a_pair():
    m = nn.LSTM(3, 4, batch_first=True)
    with pytest.raises(ValueError, match=r"tuple \(h0, c0\)"):
        lepredict.lyapunov_spectrum(m, torch.randn(2, 5, 3), h0=torch.zeros(1, 2, 4))


def test_map_bad_input():
    with pytest.raises(ValueError, match="steps=T"):
        lepredict.lyapunov_spectrum_map(henon, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"\(B, n\)"):
        lepredict.lyapunov_spectrum_map(henon, torch.zeros(2), steps=3)
    with pytest.raises(ValueError, match="B=2"):
        lepredict.lyapunov_spectrum_map(lambda h, x: h, torch.zeros(2, 2), torch.zeros(3, 5, 1))
    with pytest.raises(ValueError, match="callable"):
        lepredict.lyapunov_spectrum_map("henon", torch.zeros(2, 2), steps=3)
    with pytest.raises(ValueError, match="meta device"):
        lepredict.lyapunov_spectrum_map(henon, torch.zeros(2, 2, device="meta"), steps=3)


@pytest.mark.parametrize("where", ["inputs", "h0", "c0"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_are_refused_not_reported_as_divergence(where, bad):
    """NaN in the data would otherwise come out as spec.diverged, i.e. as a property of the
    network."""
    m = nn.LSTM(3, 4, batch_first=True)
    x, h0, c0 = torch.randn(2, 5, 3), torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
    {"inputs": x, "h0": h0, "c0": c0}[where].view(-1)[3] = bad
    name = "inputs" if where == "inputs" else "h0"
    with pytest.raises(ValueError, match=rf"{name} has 1 NaN or infinite value"):
        lepredict.lyapunov_spectrum(m, x, h0=(h0, c0))


def test_map_non_finite_inputs_are_refused():
    h0 = torch.full((2, 2), 0.1, dtype=F64)
    with pytest.raises(ValueError, match="h0 has 1 NaN"):
        lepredict.lyapunov_spectrum_map(henon, h0.index_put((torch.tensor(1), torch.tensor(0)),
                                                            torch.tensor(math.nan, dtype=F64)),
                                        steps=3)
    drive = torch.zeros(2, 5, 1, dtype=F64)
    drive[0, 4, 0] = -math.inf  # the last step: refused before any step is taken
    with pytest.raises(ValueError, match="inputs has 1 NaN"):
        lepredict.lyapunov_spectrum_map(lambda h, x: 0.5 * h + x, h0, drive)
    # Finite inputs still run and give the known answer.
    spec = lepredict.lyapunov_spectrum_map(lambda h, x: 0.5 * h + x, h0, drive.nan_to_num(neginf=0))
    torch.testing.assert_close(spec.mean, torch.full((2,), math.log(0.5), dtype=F64))


def test_module_weights_untouched_and_no_grad_leak():
    m = nn.LSTM(2, 5, num_layers=2, batch_first=True)
    before = [p.clone() for p in m.parameters()]
    spec = lepredict.lyapunov_spectrum(m, torch.randn(2, 10, 2))
    assert not spec.exponents.requires_grad
    for a, b in zip(before, m.parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; CI has none")
@pytest.mark.parametrize("arch", list(ARCHS))
def test_cuda_matches_cpu(arch):
    m = make(arch, layers=2, seed=2, scale=1.5)
    x = torch.randn(8, 50, 3, dtype=F64)
    if arch == "rnn_relu":  # dead units leave the floored directions to rounding: see all_active
        m, x = all_active(m), x.abs()
    cpu = lepredict.lyapunov_spectrum(m, x, warmup=5)
    assert int(cpu.floored.sum()) == 0
    gpu = lepredict.lyapunov_spectrum(m.cuda(), x.cuda(), warmup=5)
    torch.testing.assert_close(gpu.exponents.cpu(), cpu.exponents, rtol=0, atol=1e-9)


def _float32_errors(m, x):
    """Mean error against float64 of float32 spectra by Householder QR and by the Gram route,
    over the exponents above -20 (below that float32 resolves nothing). The mean, because the
    largest single error (an LSTM exponent near -6) swings threefold with the rounding of the
    state, both ways, between routes of equal accuracy."""
    ref = lepredict.lyapunov_spectrum(m, x, warmup=10).exponents
    m32, x32 = m.float(), x.float()
    errors = []
    for devices in ((), ("cpu",)):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(lepredict.lyapunov, "GRAM_QR_DEVICES", devices)
            got = lepredict.lyapunov_spectrum(m32, x32, warmup=10).exponents.double()
        keep = ref > -20
        errors.append(float((got - ref)[keep].abs().mean()))
    m.double()
    return errors


@pytest.mark.parametrize("arch,scale", [("rnn_tanh", 1.0), ("gru", 1.0), ("lstm", 1.0),
                                        ("rnn_tanh", 8.0), ("rnn_relu", 3.0)])
def test_gram_qr_route_is_as_accurate_as_householder_in_float32(arch, scale):
    """The Cholesky-QR route that CUDA takes for float32, run here on the CPU: against float64,
    no less accurate than float32 Householder QR, including saturated and dead units (where
    it hands the ill-conditioned matrices to Householder QR)."""
    m = make(arch, hidden=16, layers=2, seed=1, scale=scale)
    x = torch.randn(8, 60, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    householder, gram = _float32_errors(m, x)
    assert gram <= 1.2 * householder + 1e-6, (gram, householder)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_householder_qr_is_torchs_qr_bit_for_bit(dtype):
    """The engine's CPU QR (LAPACK's geqrf and orgqr, R's diagonal read off the factored
    matrix) gives torch.linalg.qr's Q and |diag R| exactly, in the engine's column-major
    layout and on singular and non-finite matrices too."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, 20, generator=g, dtype=dtype).mT  # (4, 20, 5), read in place
    a[1, :, 3] = 0.0
    a[2, 7, 1] = float("nan")
    q, d = lepredict.lyapunov._householder_qr(a)
    q_ref, r_ref = torch.linalg.qr(a)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(d, r_ref.diagonal(dim1=-2, dim2=-1).abs(), rtol=0, atol=0,
                               equal_nan=True)


def test_gram_qr_flags_what_it_cannot_factor():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 12, 12, generator=g)
    a[1, :, 3] = 0.0                     # exactly singular
    a[2, :, 5] = a[2, :, 4] * (1 + 1e-9)  # a repeated column once rounded to float32
    a[3, 0, 0] = float("nan")
    q, d, ok = lepredict.lyapunov._gram_qr(a)
    assert ok.tolist() == [True, False, False, False]
    torch.testing.assert_close(q[0].mT @ q[0], torch.eye(12), atol=1e-6, rtol=0)
    r = torch.linalg.qr(a[0].double()).R.diagonal().abs()
    torch.testing.assert_close(d[0], r, rtol=1e-6, atol=0)


@pytest.mark.parametrize("k, exponent_sum", [(2, False), (2, True), (24, False)])
def test_gru_both_tangent_paths_match_reference(k, exponent_sum):
    """A few leading exponents go through the gates' weights, many through explicit Jacobians
    (GRU_EXPLICIT_SHARE); a few with the sum of all at every step through the hidden blocks
    the LUs need and the input side's gates. All must give the reference's exponents."""
    assert (k * lepredict.lyapunov.GRU_EXPLICIT_SHARE >= 12) == (k == 24)
    m = make("gru", hidden=12, layers=2, seed=4, scale=1.4)
    x = torch.randn(3, 30, 3, dtype=F64)
    fast = lepredict.lyapunov_spectrum(m, x, k=k, warmup=5, exponent_sum=exponent_sum)
    ref = lepredict.lyapunov_spectrum_map(rnn_step(m), torch.zeros(3, 24, dtype=F64), x, k=k,
                                          warmup=5)
    torch.testing.assert_close(fast.exponents, ref.exponents, rtol=0, atol=1e-9)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("k", [None, 2])
def test_spectra_of_several_modules_equal_each_alone(arch, k):
    """lyapunov_spectra stacks the modules' weights: each gets what lyapunov_spectrum gives it
    alone (in float64 to rounding), both GRU tangent paths, seq-first inputs and h0 included."""
    modules = [make(arch, layers=2, seed=s, scale=1.2 + 0.2 * s, batch_first=False)
               for s in range(3)]
    x = torch.randn(20, 4, 3, dtype=F64)
    if arch == "rnn_relu":
        x = x.abs()
        for m in modules:
            all_active(m)
    h0 = torch.randn(2, 4, 6, dtype=F64)
    h0 = (h0, torch.randn(2, 4, 6, dtype=F64)) if arch == "lstm" else h0
    together = lepredict.lyapunov_spectra(modules, x, k=k, warmup=3, h0=h0)
    assert len(together) == 3
    for m, spec in zip(modules, together):
        alone = lepredict.lyapunov_spectrum(m, x, k=k, warmup=3, h0=h0)
        torch.testing.assert_close(spec.exponents, alone.exponents, rtol=0, atol=1e-10)
        assert (spec.state_size, spec.convention, spec.steps) == (
            alone.state_size, alone.convention, alone.steps)
        assert torch.equal(spec.diverged, alone.diverged)


def test_spectra_keep_a_diverging_module_apart():
    modules = [make("rnn_tanh", hidden=4, layers=1, seed=s) for s in range(3)]
    with torch.no_grad():
        modules[1].weight_hh_l0.fill_(float("nan"))
    x = torch.randn(2, 10, 3, dtype=F64)
    specs = lepredict.lyapunov_spectra(modules, x)
    assert specs[1].diverged.all() and specs[1].mean.isnan().all()
    for i in (0, 2):  # its neighbours' rows are untouched
        assert not specs[i].diverged.any()
        torch.testing.assert_close(specs[i].exponents,
                                   lepredict.lyapunov_spectrum(modules[i], x).exponents,
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("modules, match", [
    ([], "empty"),
    ([nn.GRU(3, 6, batch_first=True), nn.GRU(3, 5, batch_first=True)], r"rnns\[1\] differs"),
    ([nn.GRU(3, 6, batch_first=True), nn.LSTM(3, 6, batch_first=True)], r"rnns\[1\] differs"),
    ([nn.GRU(3, 6, batch_first=True), nn.GRU(3, 6, batch_first=True).double()],
     r"rnns\[1\] differs"),
])
def test_spectra_refuse_modules_of_different_shapes(modules, match):
    with pytest.raises(ValueError, match=match):
        lepredict.lyapunov_spectra(modules, torch.randn(2, 5, 3))


def test_float32_log_determinant_falls_back_to_float64_where_it_fails(monkeypatch):
    """Rows whose float32 LU gives a non-finite log-determinant are redone in float64 (a float32
    LU can overflow where a float64 one does not)."""
    jac = torch.randn(3, 5, 5)
    real = torch.linalg.slogdet

    def flaky(a):
        out = real(a)
        if a.dtype == torch.float32:  # the float32 LU "fails" on row 1
            bad = out.logabsdet.clone()
            bad[1] = float("nan")
            return type(out)((out.sign, bad))
        return out

    monkeypatch.setattr(torch.linalg, "slogdet", flaky)
    got = lepredict.lyapunov._logabsdet(jac)
    want = real(jac.double()).logabsdet
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_subclass_with_its_own_forward_is_measured_with_a_warning():
    """The engine runs nn.GRU's equations on the weights: a subclass whose forward does more is
    not what gets measured, and is told so; a subclass without its own forward, or one that
    parametrize made (weight_norm), is measured silently."""
    import warnings

    class Scaled(torch.nn.GRU):
        def forward(self, x, h=None):
            return super().forward(10.0 * x, h)

    class Plain(torch.nn.GRU):
        pass

    x = torch.randn(2, 12, 3)
    with pytest.warns(UserWarning, match="Scaled overrides nn.GRU.forward"):
        lepredict.lyapunov_spectrum(Scaled(3, 4, batch_first=True), x, k=2)
    normed = torch.nn.utils.parametrizations.weight_norm(torch.nn.GRU(3, 4, batch_first=True),
                                                         "weight_hh_l0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lepredict.lyapunov_spectrum(Plain(3, 4, batch_first=True), x, k=2)
        lepredict.lyapunov_spectrum(normed, x, k=2)


def test_exponent_sums_of_large_networks_after_set_num_threads():
    """With torch.set_num_threads(2) called, MKL's batched LU of matrices of about 152 rows and
    more hangs (pytorch/pytorch#141358): the sums of a GRU-256 and of a hidden-only LSTM-200,
    which take LUs of the Jacobian blocks, finish there, equal to those of one thread."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, torch, lepredict
        torch.set_num_threads(int(sys.argv[1]))
        torch.manual_seed(0)
        for rnn, state in ((torch.nn.GRU(4, 256), "full"), (torch.nn.LSTM(4, 200), "hidden")):
            s = lepredict.lyapunov_spectrum(rnn, torch.randn(12, 3, 4), k=4, warmup=2,
                                            exponent_sum=True, lstm_state=state)
            print(s.exponent_sum.tolist())
    """)
    sums = [[json.loads(line) for line in subprocess.run(
                [sys.executable, "-c", code, threads], capture_output=True, text=True,
                timeout=120, check=True).stdout.splitlines()]
            for threads in ("1", "2", str(2 * (os.cpu_count() or 1)))]
    assert [len(s) for s in sums[0]] == [3, 3]
    for many in sums[1:]:  # more threads than cores too (numpy's LU there)
        for got, one in zip(many, sums[0]):  # the GEMMs round differently with the threads
            assert got == pytest.approx(one, rel=1e-5)


def test_the_starting_rows_are_kept_and_the_same_under_inference_mode():
    """A few leading exponents start from fixed random rows, drawn once per (k, n): first asked
    for under torch.inference_mode, they are still a normal tensor for later callers, and every
    call measures the same numbers."""
    from lepredict.lyapunov import _random_rows

    _random_rows.cache_clear()
    m = make("gru", input_size=3, hidden=20, layers=1, seed=3).float()
    x = torch.randn(2, 30, 3)
    with torch.inference_mode():
        first = lepredict.lyapunov_spectrum(m, x, k=4, warmup=5).exponents
    assert not _random_rows(4, 20).is_inference()
    again = lepredict.lyapunov_spectrum(m, x, k=4, warmup=5).exponents
    assert torch.equal(first, again)
    rows = _random_rows(4, 20)
    torch.testing.assert_close(rows @ rows.T, torch.eye(4, dtype=torch.float64))
