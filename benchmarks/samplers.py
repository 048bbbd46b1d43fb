# SPDX-License-Identifier: Apache-2.0
"""Sampler benchmarks: ratios measured side by side in one run (nothing asserted).

1. Effective samples per second on a 10-D latent posterior declared as a Pyro
   model (Bayesian logistic regression): ``mcmc.sample`` with 1024 MALA chains
   versus ``pyro.infer.MCMC`` with NUTS, one chain. ESS is ArviZ's bulk ESS, the
   minimum over the 10 coordinates; time is the wall time of the whole run,
   warmup included.
2. Overhead: 1024 MALA chains with a fixed step, ``mcmc.sample`` versus the same
   loop written in bare eager torch (same steps, draws kept), for the
   Pyro-declared model and for a plain potential function: eager on the traced
   path (the default), eager on the Pyro path (``traced=False``) and with
   ``compile=True`` (compile time excluded); plus the cost of one potential +
   gradient evaluation through the energy view versus by hand. The Pyro model is
   declared twice: with the likelihood as a ``pyro.factor`` written with the
   same tensor operations as the hand-written potential (the framework's cost
   alone), and with Bernoulli observed sites (adding what
   ``Bernoulli.log_prob`` costs over the hand-written expression).
3. ``--gpu``: chain-steps per second of MALA at 10k, 100k and 1M chains on a
   2-hidden-layer MLP energy in 64 dimensions, when CUDA is available.
4. BlackJAX: time per MALA step on the same 10-D logistic regression posterior
   (500 points) at 1, 64 and 1024 chains, pyro_ebm (the Pyro model with
   Bernoulli observed sites, eager and ``compile=True``; the plain potential
   compiled; compiled runs take 10 steps per call, the default
   ``steps_per_call``) versus BlackJAX's ``mala`` step, ``jax.vmap``-ed over the chains
   and run in a ``jax.lax.scan`` under ``jax.jit`` (draws kept, compile time
   excluded, XLA on one thread with ``--threads 1``). Skipped with a note when
   jax and blackjax are not installed (``pip install pyro-ebm[bench]``).

    python benchmarks/samplers.py --threads 1
    python benchmarks/samplers.py --quick          # seconds, for a smoke run
    python benchmarks/samplers.py --sections gpu
    python benchmarks/samplers.py --threads 1 --sections blackjax
"""

import argparse
import contextlib
import math
import os
import time
import warnings

import pyro
import pyro.distributions as dist
import torch

from pyro_ebm import mcmc
from pyro_ebm.energy import energy_view
from pyro_ebm.mcmc.kernels import potential_and_grad

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

DIM = 10


def logistic_data(num_data, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(num_data, DIM, generator=gen)
    w_true = torch.randn(DIM, generator=gen)
    labels = torch.bernoulli(torch.sigmoid(features @ w_true), generator=gen)
    return features, labels


def logistic_model(features, labels):
    w = pyro.sample("w", dist.Normal(torch.zeros(DIM), 1.0).to_event(1))
    # w is (10,) in a plain run and (C, 1, 10) under the sampler's chain plate (left
    # of the data plate): one matrix product serves both
    logits = (w.reshape(-1, DIM) @ features.T).reshape(w.shape[:-2] + (-1,))
    with pyro.plate("data", len(labels)):
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=labels)


def logistic_factor_model(features, labels):
    """The same posterior with the likelihood as one ``pyro.factor`` (the EBLVM
    style, log p̃ = -E), written with the same tensor operations as the
    hand-written potential."""
    w = pyro.sample("w", dist.Normal(torch.zeros(DIM), 1.0).to_event(1))
    logits = w @ features.T  # (N,) in a plain run, (C, N) under the chain plate
    nll = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, labels.expand_as(logits), reduction="none").sum(-1)
    pyro.factor("log_likelihood", -nll)


def logistic_potential(features, labels):
    """The same posterior by hand: U(w) = ‖w‖²/2 + Σ BCE(x_i·w, y_i), (C, 10) -> (C,)."""
    def potential(w):
        logits = w @ features.T
        nll = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, labels.expand_as(logits), reduction="none").sum(-1)
        return 0.5 * w.pow(2).sum(-1) + nll

    return potential


def min_ess(draws):
    """ArviZ bulk ESS of (chain, draw, D) draws, minimum over coordinates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = az.from_dict(posterior={"w": draws.detach().cpu().numpy()})
        return float(az.ess(idata)["w"].min())


def bare_mala(potential, x, step_size, num_steps, num_warmup):
    """MALA for C chains written directly in torch: the reference loop."""
    draws = []
    with torch.no_grad():
        u, g = potential_and_grad(potential, x)
        for i in range(num_steps):
            noise = torch.randn_like(x)
            prop = x - step_size * g + math.sqrt(2 * step_size) * noise
            with torch.enable_grad():
                xp = prop.requires_grad_(True)
                up = potential(xp)
                (gp,) = torch.autograd.grad(up.sum(), xp)
            up = up.detach()
            log_ratio = (u - up - (x - prop + step_size * gp).pow(2).sum(-1) / (4 * step_size)
                         + 0.5 * noise.pow(2).sum(-1))
            accept = torch.rand_like(u).log() < log_ratio
            x = torch.where(accept[:, None], prop, x)
            u = torch.where(accept, up, u)
            g = torch.where(accept[:, None], gp, g)
            if i >= num_warmup:
                draws.append(x)
    return torch.stack(draws, 1)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def ess_per_second(args):
    features, labels = logistic_data(args.num_data)
    torch.manual_seed(0)
    t_ours, samples = timed(lambda: mcmc.sample(
        logistic_model, mcmc.MALA(0.05), args.chains, args.samples, warmup_steps=args.warmup,
        model_args=(features, labels), progress=False))
    ess_ours = min_ess(samples.get_samples()["w"])
    pyro.set_rng_seed(0)
    nuts = pyro.infer.MCMC(pyro.infer.NUTS(logistic_model), num_samples=args.nuts_samples,
                           warmup_steps=args.nuts_warmup, disable_progbar=True)
    t_nuts, _ = timed(lambda: nuts.run(features, labels))
    w_nuts = nuts.get_samples(group_by_chain=True)["w"]
    ess_nuts = min_ess(w_nuts)
    # agreement of the two posteriors: largest |mean difference| in NUTS standard errors
    w_ours = samples.get_samples()["w"]
    se = w_nuts.reshape(-1, DIM).std(0) / math.sqrt(max(ess_nuts, 1.0))
    z = ((w_ours.reshape(-1, DIM).mean(0) - w_nuts.reshape(-1, DIM).mean(0)).abs() / se).max()
    rows = [
        ("mcmc.sample MALA", f"{args.chains} x {args.samples} (+{args.warmup} warmup)", t_ours, ess_ours),
        ("pyro NUTS", f"1 x {args.nuts_samples} (+{args.nuts_warmup} warmup)", t_nuts, ess_nuts),
    ]
    print(f"\n## 1. ESS/s, 10-D Bayesian logistic regression posterior ({args.num_data} data points)\n")
    print("| sampler | chains x draws | wall s | min ESS (bulk) | ESS/s |")
    print("|---|---|---|---|---|")
    for name, size, t, e in rows:
        print(f"| {name} | {size} | {t:.2f} | {e:.0f} | {e / t:.1f} |")
    ratio = (ess_ours / t_ours) / (ess_nuts / t_nuts)
    print(f"\nESS/s ratio pyro_ebm / NUTS: **{ratio:.1f}x** (target >= 20x); "
          f"MALA acceptance {float(samples.stats['accept_prob'].mean()):.2f}; posterior means agree "
          f"within {float(z):.1f} NUTS standard errors")
    return ratio


def _overhead_runs(args, num_data):
    """Best-of-n wall times of the three MALA loops and of one potential + gradient."""
    steps, warm = args.overhead_steps, args.overhead_steps // 2
    features, labels = logistic_data(num_data)
    pot = logistic_potential(features, labels)
    latent = energy_view(logistic_factor_model).latent_potential(features, labels)
    x0 = 0.1 * torch.randn(args.chains, DIM)
    step = 0.5 / num_data  # about the optimal MALA step for this posterior
    kernel = mcmc.MALA(step, adapt_step_size=False)

    def plain(compile=False):
        return lambda: mcmc.sample(potential_fn=pot, kernel=kernel, num_chains=args.chains,
                                   num_samples=steps - warm, warmup_steps=warm, initial=x0,
                                   progress=False, compile=compile)

    def model(fn, compile=False, traced=True):
        def run():
            with traced_path(fn, traced):
                return mcmc.sample(fn, kernel, args.chains, steps - warm, warmup_steps=warm,
                                   model_args=(features, labels), initial=x0, progress=False,
                                   compile=compile)
        return run

    runs = {
        "bare": lambda: bare_mala(pot, x0, step, steps, warm),
        "plain": plain(),
        "plain_compiled": plain(True),
        "factor": model(logistic_factor_model),
        "factor_pyro": model(logistic_factor_model, traced=False),
        "factor_compiled": model(logistic_factor_model, True),
        "obs": model(logistic_model),
        "obs_compiled": model(logistic_model, True),
        "eval_view": lambda: [potential_and_grad(latent, x0) for _ in range(50)],
        "eval_hand": lambda: [potential_and_grad(pot, x0) for _ in range(50)],
    }
    for name, fn in runs.items():  # compile (and trace) before timing
        if "compiled" in name:
            fn()
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):  # interleaved, best of n: the machine may be shared
        for name, fn in runs.items():
            best[name] = min(best[name], timed(fn)[0])
    best["eval_view"] /= 50
    best["eval_hand"] /= 50
    return best


@contextlib.contextmanager
def traced_path(model, traced=True):
    """Run ``model``'s energy view on the traced path (default) or the Pyro path."""
    view = energy_view(model)
    before, view.traced = view.traced, traced
    try:
        yield
    finally:
        view.traced = before


def overhead(args):
    print(f"\n## 2. Overhead vs a bare torch loop, {args.chains} MALA chains, "
          f"{args.overhead_steps} steps, fixed step size\n")
    print("| energy | data points | bare torch s | pyro_ebm s | ratio | target |")
    print("|---|---|---|---|---|---|")
    results = {}
    for num_data in args.overhead_data:
        best = results[num_data] = _overhead_runs(args, num_data)
        for name, label, target in (("factor", "Pyro model, pyro.factor", 1.1),
                                    ("factor_pyro", "Pyro model, pyro.factor, traced=False", None),
                                    ("factor_compiled", "Pyro model, pyro.factor, compile=True", None),
                                    ("obs", "Pyro model, Bernoulli obs sites", 1.3),
                                    ("obs_compiled", "Pyro model, Bernoulli obs sites, compile=True", None),
                                    ("plain", "plain potential", 1.1),
                                    ("plain_compiled", "plain potential, compile=True", None)):
            target = "-" if target is None else f"<= {target}x"
            print(f"| {label} | {num_data} | {best['bare']:.3f} | {best[name]:.3f} | "
                  f"{best[name] / best['bare']:.2f}x | {target} |")
    print(f"\nOne potential + gradient evaluation ({args.chains} chains):\n")
    print("| data points | energy view (pyro.factor model) ms | by hand ms | difference ms |")
    print("|---|---|---|---|")
    for num_data, best in results.items():
        t_view, t_hand = best["eval_view"], best["eval_hand"]
        print(f"| {num_data} | {1e3 * t_view:.3f} | {1e3 * t_hand:.3f} | {1e3 * (t_view - t_hand):.3f} |")
    return results


def gpu(args):
    print("\n## 3. GPU: MALA chain-steps/s, 2-hidden-layer MLP energy in 64-D\n")
    device = torch.device(args.gpu_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("skipped: CUDA is not available")
        return None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    energy = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.SiLU(), torch.nn.Linear(256, 256),
                                 torch.nn.SiLU(), torch.nn.Linear(256, 1)).to(device)
    for p in energy.parameters():
        p.requires_grad_(False)

    def potential(x):
        return energy(x).squeeze(-1) + 0.5 * x.pow(2).sum(-1)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}\n")
    print("| chains | steps | seconds | chain-steps/s |")
    print("|---|---|---|---|")
    kernel = mcmc.MALA(0.01, adapt_step_size=False)
    out = {}
    for chains in args.gpu_chains:
        state = kernel.init(torch.randn(chains, 64, device=device), potential)
        for _ in range(3):
            state, _ = kernel.step(state)
        sync()
        start = time.perf_counter()
        for _ in range(args.gpu_steps):
            state, _ = kernel.step(state)
        sync()
        seconds = time.perf_counter() - start
        out[chains] = chains * args.gpu_steps / seconds
        print(f"| {chains:,} | {args.gpu_steps} | {seconds:.3f} | {out[chains]:.3g} |")
        del state
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def _blackjax_mala(features, labels, step_size, num_chains, num_steps):
    """``run(seed)``: BlackJAX's MALA on the posterior, vmapped over the chains, the
    steps in a ``jax.lax.scan`` (draws kept) under ``jax.jit``; blocks until done."""
    import blackjax
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(features.numpy())
    y = jnp.asarray(labels.numpy())

    def logdensity(w):  # log N(w; 0, I) + sum_i log Bernoulli(y_i; sigmoid(x_i . w)), up to constants
        logits = x @ w
        return -0.5 * jnp.sum(w * w) + jnp.sum(y * logits - jnp.logaddexp(0.0, logits))

    mala = blackjax.mala(logdensity, step_size)

    @jax.jit
    def run(key, position):
        states = jax.vmap(mala.init)(position)

        def one(states, key):
            keys = jax.random.split(key, num_chains)
            states, _ = jax.vmap(mala.step)(keys, states)
            return states, states.position

        _, draws = jax.lax.scan(one, states, jax.random.split(key, num_steps))
        return draws

    position = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (num_chains, DIM))
    return lambda seed: run(jax.random.PRNGKey(seed), position).block_until_ready()


def blackjax_row(args):
    print(f"\n## 4. MALA time per step vs BlackJAX, 10-D logistic regression ({args.num_data} data points)\n")
    if args.threads == 1:  # before jax starts: XLA's CPU backend on one thread
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                   "intra_op_parallelism_threads=1").strip()
    try:
        import blackjax  # noqa: F401
        import jax
    except ImportError:
        print("skipped: jax and blackjax are not installed (pip install 'pyro-ebm[bench]')")
        return None
    features, labels = logistic_data(args.num_data)
    pot = logistic_potential(features, labels)
    step = 0.5 / args.num_data
    steps = args.blackjax_steps
    kernel = mcmc.MALA(step, adapt_step_size=False)
    print(f"jax {jax.__version__}, blackjax {blackjax.__version__}, {steps} steps, fixed step size; "
          "time per step in ms (best of {0}); ratio = pyro_ebm / BlackJAX\n".format(args.repeats))
    print("| chains | BlackJAX jit+vmap | pyro_ebm eager (Pyro model) | pyro_ebm compile=True (Pyro model) "
          "| pyro_ebm compile=True (plain potential) | target (compiled) |")
    print("|---|---|---|---|---|---|")
    out = {}

    def ours(chains, x0, compile, target=logistic_model):
        if target is None:
            return lambda: mcmc.sample(potential_fn=pot, kernel=kernel, num_chains=chains,
                                       num_samples=steps, initial=x0, progress=False, compile=compile)
        return lambda: mcmc.sample(target, kernel, chains, steps, model_args=(features, labels),
                                   initial=x0, progress=False, compile=compile)

    for chains in args.blackjax_chains:
        x0 = 0.1 * torch.randn(chains, DIM)
        bj = _blackjax_mala(features, labels, step, chains, steps)
        runs = {"blackjax": lambda bj=bj: bj(0), "eager": ours(chains, x0, False),
                "compiled": ours(chains, x0, True), "plain_compiled": ours(chains, x0, True, None)}
        for fn in runs.values():  # compile, trace and warm up before timing
            fn()
        best = {k: float("inf") for k in runs}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                best[name] = min(best[name], timed(fn)[0] / steps)
        ref = best["blackjax"]
        target = "<= 2x" if chains == 1 else "<= 1x"
        cells = " | ".join(f"{1e3 * best[k]:.3f} ({best[k] / ref:.2f}x)" for k in ("eager", "compiled",
                                                                                    "plain_compiled"))
        print(f"| {chains} | {1e3 * ref:.3f} | {cells} | {target} |")
        out[chains] = best
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--num-data", type=int, default=500)
    parser.add_argument("--nuts-samples", type=int, default=500)
    parser.add_argument("--nuts-warmup", type=int, default=300)
    parser.add_argument("--overhead-steps", type=int, default=200)
    parser.add_argument("--overhead-data", type=int, nargs="+", default=[50, 500, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--sections", nargs="+", choices=["ess", "overhead", "gpu", "blackjax"],
                        default=["ess", "overhead", "blackjax"], help="sections to run")
    parser.add_argument("--blackjax-chains", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--blackjax-steps", type=int, default=200)
    parser.add_argument("--gpu", action="store_true", help="also run the GPU section")
    parser.add_argument("--gpu-chains", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--gpu-steps", type=int, default=20)
    parser.add_argument("--gpu-device", default="cuda", help="device of the GPU section ('cpu' to try it)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.chains, args.samples, args.warmup = 64, 30, 30
        args.nuts_samples, args.nuts_warmup, args.overhead_steps, args.repeats = 30, 20, 20, 1
        args.overhead_data, args.gpu_chains, args.gpu_steps = [50], [1000], 2
        args.blackjax_chains, args.blackjax_steps = [1, 64], 10
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# pyro_ebm sampler benchmarks (torch {torch.__version__}, {torch.get_num_threads()} CPU threads)")
    results = {}
    if "ess" in args.sections:
        results["ess_ratio"] = ess_per_second(args)
    if "overhead" in args.sections:
        results["overhead"] = overhead(args)
    if args.gpu or "gpu" in args.sections:
        results["gpu"] = gpu(args)
    if "blackjax" in args.sections:
        results["blackjax"] = blackjax_row(args)
    return results


if __name__ == "__main__":
    main()
