# SPDX-License-Identifier: Apache-2.0
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import arviz as az
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import MCMC, NUTS
from torch import nn

from pyro_ebm import mcmc
from pyro_ebm.models import GEBM
from pyro_ebm.models.nets import MLP, RealNVP

D64 = torch.float64


class Quadratic(nn.Module):
    """G(z) = (z, z^2 / 2): a nonlinear generator from a 1-D latent to 2-D."""

    def forward(self, z):
        return torch.cat([z, 0.5 * z**2], -1)


class Linear(nn.Module):
    """E(x) = w . x with fixed weights (a buffer sets the dtype)."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", torch.as_tensor(w, dtype=D64))

    def forward(self, x):
        return x @ self.w


class Banana(nn.Module):
    """G(z) = (z0, z1 + b z0^2), a curved map of a 2-D latent."""

    def __init__(self, b=0.5):
        super().__init__()
        self.register_buffer("b", torch.tensor(b, dtype=D64))

    def forward(self, z):
        return torch.stack([z[..., 0], z[..., 1] + self.b * z[..., 0] ** 2], -1)


class Quartic(nn.Module):
    """E(x) = 0.5 x0 + x1^2 (one value per item, with a trailing unit dim)."""

    def forward(self, x):
        return (0.5 * x[..., 0] + x[..., 1] ** 2).unsqueeze(-1)


def test_model_sites_and_potential_match_closed_form():
    gebm = GEBM(Quadratic(), Linear([-1.5, 0.5]), latent_dim=1, temperature=2.0)
    trace = poutine.trace(gebm).get_trace(7)
    z = trace.nodes["z"]["value"]
    assert z.shape == (7, 1) and z.dtype == D64
    assert torch.equal(trace.nodes["x"]["value"], Quadratic()(z))
    # the factor is -E(G(z)) / T
    e = Linear([-1.5, 0.5])(Quadratic()(z))
    assert torch.allclose(trace.nodes["energy"]["fn"].log_factor, -e / 2.0)
    # latent potential: 0.5 z^2 + E(G(z)) / T + 0.5 log(2 pi), one chain per draw
    potential = gebm.latent_potential()
    zs = torch.linspace(-3, 3, 11, dtype=D64).unsqueeze(-1)
    expected = 0.5 * zs[:, 0] ** 2 + Linear([-1.5, 0.5])(Quadratic()(zs)) / 2.0 + 0.5 * math.log(2 * math.pi)
    assert torch.allclose(potential(zs), expected, atol=1e-12)


def test_log_partition_estimate_and_stderr_match_closed_form():
    # G(z) = z, E(x) = a x: Z = E[exp(-a z)] = exp(a^2 / 2); Var(w) / E[w]^2 = exp(a^2) - 1
    torch.manual_seed(0)
    a, n = 0.7, 200_000
    gebm = GEBM(nn.Identity(), Linear([a]), latent_dim=1)
    log_z, stderr = gebm.log_partition_estimate(n, batch_size=50_000)
    exact_se = math.sqrt((math.exp(a**2) - 1) / n)
    assert abs(stderr / exact_se - 1) < 0.1
    assert abs(log_z - a**2 / 2) < 4 * exact_se
    # at temperature T the weights are exp(-a z / T): log Z = a^2 / (2 T^2)
    hot = GEBM(nn.Identity(), Linear([a]), latent_dim=1, temperature=2.0)
    log_z, stderr = hot.log_partition_estimate(n)
    assert abs(log_z - a**2 / 8) < 4 * stderr


@pytest.mark.parametrize(
    "kernel, steps, bias",
    [
        (mcmc.MALA(0.3), 150, 0.0),
        (mcmc.HMC(0.3, num_steps=4), 60, 0.0),
        (mcmc.ULA(0.02), 300, 0.05),
        (mcmc.UnderdampedLangevin(0.2, friction=2.0), 150, 0.05),
    ],
    ids=["MALA", "HMC", "ULA", "Underdamped"],
)
def test_sample_targets_latent_posterior(kernel, steps, bias):
    # G(z) = (z, z^2/2), E(x) = -1.5 x0 + 0.5 x1: nu(z) ∝ exp(-z^2/2 + 1.5 z - z^2/4)
    # is Gaussian with precision 1.5, mean 1, variance 2/3.
    torch.manual_seed(1)
    gebm = GEBM(Quadratic(), Linear([-1.5, 0.5]), latent_dim=1)
    n = 1000
    x, z = gebm.sample(n, kernel, num_steps=steps, return_latent=True)
    assert x.shape == (n, 2) and z.shape == (n, 1)
    assert torch.allclose(x, Quadratic()(z))
    mean, var = 1.0, 2.0 / 3.0
    # independent chains: se(mean) = sd / sqrt(n), se(var) = var sqrt(2 / n);
    # ULA and underdamped Langevin carry a discretization bias of order the step
    assert abs(float(z.mean()) - mean) < 4 * math.sqrt(var / n) + bias
    assert abs(float(z.var()) / var - 1) < 4 * math.sqrt(2 / n) + 2 * bias


def test_sample_validates_arguments():
    gebm = GEBM(Quadratic(), Linear([-1.5, 0.5]), latent_dim=1)
    with pytest.raises(ValueError, match=r"initial latents must have shape \(5, 1\)"):
        gebm.sample(5, mcmc.ULA(0.1), 3, initial=torch.zeros(5, 2, dtype=D64))
    with pytest.raises(ValueError, match="num_steps"):
        gebm.sample(5, mcmc.ULA(0.1), -1)
    z0 = torch.full((4, 1), 0.5, dtype=D64)
    x, z = gebm.sample(4, mcmc.ULA(0.1), 0, initial=z0, return_latent=True)
    assert torch.equal(z, z0) and torch.allclose(x, Quadratic()(z0))


class _State(NamedTuple):
    position: torch.Tensor
    potential: object


class _Info(NamedTuple):
    diverging: torch.Tensor


class GradientDescent:
    """A kernel written against the interface alone, z' = z - h grad U(z), that
    counts its steps."""

    def __init__(self, step_size):
        self.step_size, self.steps = step_size, 0

    def init(self, position, potential):
        return _State(position, potential)

    def step(self, state):
        with torch.enable_grad():
            z = state.position.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(state.potential(z).sum(), z)
        self.steps += 1
        z = state.position - self.step_size * grad
        return _State(z, state.potential), _Info(~torch.isfinite(z).all(-1))


def test_sample_drives_any_kernel_through_init_and_step():
    """GEBM.sample runs the kernel it is given by init/step alone (so any object
    with that interface works) for exactly num_steps steps: gradient descent on
    U(z) = z^2/2 + E(G(z)) = 0.75 z^2 - 1.5 z + const moves z0 toward the mode 1 as
    z_k = 1 + (1 - 1.5 h)^k (z0 - 1)."""
    gebm = GEBM(Quadratic(), Linear([-1.5, 0.5]), latent_dim=1)
    z0 = torch.tensor([[-1.0], [3.0]], dtype=D64)
    kernel = GradientDescent(0.2)
    x, z = gebm.sample(2, kernel, num_steps=5, initial=z0, return_latent=True)
    assert kernel.steps == 5
    torch.testing.assert_close(z, 1 + (1 - 1.5 * 0.2) ** 5 * (z0 - 1))
    torch.testing.assert_close(x, Quadratic()(z))
    with pytest.raises(TypeError, match=r"kernel must have init\(position, potential\)"):
        gebm.sample(2, object(), num_steps=5)


def test_sample_warns_about_divergent_chains():
    gebm = GEBM(Quadratic(), Linear([-1.5, 0.5]), latent_dim=1)

    def blow_up(z):  # NaN potential beyond z = 2: chains proposing there stay put
        u = 0.75 * z[:, 0] ** 2
        return torch.where(z[:, 0] > 2, torch.full_like(u, float("nan")), u)

    gebm.latent_potential = lambda: blow_up
    with pytest.warns(RuntimeWarning, match=r"of 50 GEBM latent chains had a non-finite ULA step"):
        x, z = gebm.sample(50, mcmc.ULA(1.0), num_steps=20, initial=torch.full((50, 1), 1.9, dtype=D64),
                           return_latent=True)
    assert torch.isfinite(z).all() and (z <= 2).all()


def test_gebm_does_not_import_the_samplers():
    """Models sit below mcmc: GEBM.sample, driven through the kernel's own
    init/step, leaves pyro_ebm.mcmc unimported."""
    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from pyro_ebm.models import GEBM\n"
        "class Kernel:  # the interface alone: state.position, info.diverging\n"
        "    def init(self, position, potential):\n"
        "        return type('State', (), {'position': position})()\n"
        "    def step(self, state):\n"
        "        return state, type('Info', (), {'diverging': torch.zeros(3, dtype=torch.bool)})()\n"
        "gebm = GEBM(nn.Identity(), nn.Linear(2, 1), latent_dim=2)\n"
        "x = gebm.sample(3, Kernel(), num_steps=2)\n"
        "assert x.shape == (3, 2), x.shape\n"
        "print(sorted(m for m in sys.modules if m.startswith('pyro_ebm.mcmc')))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         cwd=root, env=env)
    assert out.returncode == 0, out.stderr
    assert "pyro_ebm.mcmc" not in out.stdout, out.stdout


def test_bad_construction_and_energy_shape():
    with pytest.raises(ValueError, match="temperature"):
        GEBM(Quadratic(), Linear([1.0, 1.0]), 1, temperature=0.0)
    with pytest.raises(ValueError, match="latent_dim"):
        GEBM(Quadratic(), Linear([1.0, 1.0]), 0)
    bad = GEBM(Quadratic(), nn.Identity(), 1)  # returns (n, 2), not one value per item
    with pytest.raises(ValueError, match=r"one value per item, shape \(3,\).*returned shape \(3, 2\)"):
        bad.energy_values(torch.zeros(3, 2))


def test_mcmc_sample_agrees_with_pyro_nuts():
    """pyro_ebm's MALA chains and Pyro's NUTS on the same GEBM latent posterior."""
    gebm = GEBM(Banana(0.5), Quartic(), latent_dim=2)
    pyro.set_rng_seed(0)
    nuts = MCMC(NUTS(gebm), num_samples=300, warmup_steps=150, disable_progbar=True)
    nuts.run(1)
    z_nuts = nuts.get_samples()["z"][:, 0]  # (draws, 2)
    torch.manual_seed(0)
    samples = mcmc.sample(gebm, mcmc.MALA(0.3), num_chains=400, num_samples=20, warmup_steps=150,
                          model_args=(1,), progress=False)
    z_ours = samples.get_samples()["z"][:, :, 0]  # (chain, draw, 2)
    assert z_ours.shape == (400, 20, 2)
    for d in range(2):
        a = z_nuts[:, d].numpy()
        b = z_ours[..., d].numpy()
        ess_a = float(az.ess(a[None]))
        ess_b = float(az.ess(b))
        # mean and second moment, each within 4 Monte Carlo standard errors
        for stat in (lambda t: t, lambda t: t**2):
            sa, sb = stat(a), stat(b)
            se = math.sqrt(sa.var() / ess_a + sb.var() / ess_b)
            assert abs(sa.mean() - sb.mean()) < 4 * se, (d, sa.mean(), sb.mean(), se)
    # the posterior is not the prior: E pulls z1 + 0.5 z0^2 toward 0 and z0 negative
    assert float(z_ours[..., 0].mean()) < -0.2


def test_realnvp_log_prob_is_change_of_variables():
    torch.manual_seed(0)
    flow = RealNVP(3, num_layers=3, hidden_features=(8,)).double()
    with torch.no_grad():  # make the couplings far from the identity
        for p in flow.parameters():
            p.normal_(0, 0.5)
    z = torch.randn(4, 3, dtype=D64)
    x = flow(z)
    jac = torch.stack([torch.autograd.functional.jacobian(flow, zi) for zi in z])
    base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    expected = base - torch.linalg.slogdet(jac)[1]
    assert torch.allclose(flow.log_prob(x.detach()), expected, atol=1e-9)
    with pytest.raises(ValueError, match="dim >= 2"):
        RealNVP(1)


def test_mlp_shapes_and_spectral_norm():
    torch.manual_seed(0)
    net = MLP(3, 1, hidden_features=(16, 16), spectral_norm=True)
    assert net(torch.randn(5, 7, 3)).shape == (5, 7, 1)
    for _ in range(20):  # power iterations run in training mode
        net(torch.randn(2, 3))
    for layer in net:
        if isinstance(layer, nn.Linear):
            assert torch.linalg.matrix_norm(layer.weight, ord=2) < 1.05
    with pytest.raises(ValueError, match="unknown activation"):
        MLP(2, 1, activation="swish2")


def test_example_script_runs_at_tiny_size(tmp_path, capsys, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "examples" / "gebm_kale.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--iterations", "3", "--chains", "4", "--steps", "5",
                                      "--samples", "300", "--out", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "r_hat" in out and "ess_bulk" in out  # ArviZ's summary of the latent chains
    log_z = float(out.split("log Z = ")[1].split()[0])
    assert math.isfinite(log_z)
    mmds = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("MMD²")]
    assert len(mmds) == 3 and all(math.isfinite(m) for m in mmds)
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == ["gebm_samples_ula.png", "gebm_samples_underdamped.png", "gebm_trace_ula.png",
                       "gebm_trace_underdamped.png"]
