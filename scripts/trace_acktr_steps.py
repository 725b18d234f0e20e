"""Does ACKTR's step move the policy as its trust region intends? A trace of the first updates.

Trains ACKTR with a preset (and ``--set`` overrides) for a number of updates and records,
for every K-FAC update: the trust-region scale ``ν``, each layer's share of the quadratic
``Σ⟨X, ∇⟩``, the **measured** KL between the policy before and after the update on the
update's own batch, and the RMS change of the value prediction there. Prints medians over
windows of updates, and writes every update to ``--out`` (CSV) if given.

How well a step spends its KL: its surrogate gain ``mean(A·Δlog π(a|s))`` on the batch per
``√(2·KL)``, beside the same figure for the plain policy gradient of the batch scaled to
the same measured KL; for ACKTR also for the K-FAC-preconditioned policy gradient (the
step's direction without the value and entropy terms) and the K-FAC-preconditioned gradient
of the whole loss (the step's direction without momentum). The exact natural gradient of
the policy's objective maximises the figure, so a natural-gradient step should be ahead of
the gradient there. ``--natural-gradient`` adds the direction of conjugate gradient on the
batch's exact Fisher-vector products: by default TRPO's (ngrl's MuJoCo preset: 25
iterations, damping 0.1), against which a K-FAC step's figure can be read as a fraction.
Less ``--cg-damping`` and more ``--cg-steps`` move it towards the exact natural gradient,
but in float32 on a near-singular batch Fisher the iterates lose accuracy first (on
CartPole, damping 1e-8 and 100 iterations scored below the gradient).

The figures are in-sample: a direction fitted to the batch's noise gains on that batch.
``--held-out`` takes each probe's direction from a random half of the batch and measures
it on the other half (the step itself, fitted to the whole batch, is measured as before):
the gain that carries over to actions it was not fitted to.

``--algo a2c`` traces SB3's A2C with its preset the same way (the measured KL, value change
and entropy; it has no trust region): how far a first-order agent moves its policy per
update, beside ACKTR's budget.

    python scripts/trace_acktr_steps.py --env Breakout --updates 60
    python scripts/trace_acktr_steps.py --env Breakout --updates 60 --set curvature=ekfac
    python scripts/trace_acktr_steps.py --env Breakout --updates 20 \
        --resume runs/acktr_Breakout/checkpoint.zip --set trust_region=split
    python scripts/trace_acktr_steps.py --algo a2c --env Breakout --updates 200 \
        --resume runs/a2c_Breakout/checkpoint.zip
    python scripts/trace_acktr_steps.py --env Walker2d --updates 20 --natural-gradient \
        --resume runs/acktr_Walker2d/checkpoint.zip
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from ngrl.agents import ACKTR
from ngrl.agents.checkpoints import (
    CheckpointError,
    has_normalizer,
    load_normalizer,
    read_run_metadata,
)
from ngrl.agents.presets import algorithm_class, resolve_config
from ngrl.envs import make_vec_env, resolve
from ngrl.helpers import add_override_option, parse_override
from ngrl.linalg import conjugate_gradient
from ngrl.optim.conjugate_gradient import fisher_vector_product

#: The algorithms a trace takes: ACKTR, and SB3's A2C for its measured steps beside it.
ALGOS = ("acktr", "a2c")
#: ``--natural-gradient``'s default conjugate gradient: ngrl's TRPO MuJoCo preset's.
CG_STEPS, CG_DAMPING = 25, 0.1


def distribution_and_values(policy: Any, observations: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """The torch action distribution (in float64: the KL of a small step cancels to a few
    float32 ulps otherwise) and the values of any SB3 actor-critic policy."""
    if hasattr(policy, "distribution_and_values"):  # ngrl's policies: one pass
        distribution, values = policy.distribution_and_values(observations)
        return in_float64(distribution.distribution), values
    distribution = policy.get_distribution(observations).distribution
    return in_float64(distribution), policy.predict_values(observations)


def rows_of(distribution: Any, index: torch.Tensor) -> Any:
    """The categorical or normal distribution of the examples ``index`` only."""
    if isinstance(distribution, torch.distributions.Categorical):
        return torch.distributions.Categorical(logits=distribution.logits[index])
    if isinstance(distribution, torch.distributions.Normal):
        return torch.distributions.Normal(distribution.loc[index], distribution.scale[index])
    raise TypeError(f"--held-out takes categorical and normal policies, not {distribution}")


def in_float64(distribution: Any) -> Any:
    """A categorical or normal distribution with float64 parameters (others as they are)."""
    if isinstance(distribution, torch.distributions.Categorical):
        return torch.distributions.Categorical(logits=distribution.logits.double())
    if isinstance(distribution, torch.distributions.Normal):
        return torch.distributions.Normal(distribution.loc.double(), distribution.scale.double())
    return distribution


def log_likelihood(distribution: Any, actions: torch.Tensor) -> torch.Tensor:
    """``log π(a|s)`` of each example, summed over the action's dimensions."""
    if isinstance(distribution, torch.distributions.Categorical):
        return distribution.log_prob(actions.long().reshape(-1))
    log_p = distribution.log_prob(actions)
    return log_p.reshape(log_p.shape[0], -1).sum(1)


def per_example_kl(before: Any, after: Any) -> torch.Tensor:
    """``KL(π_before ‖ π_after)`` of each example, summed over the action's dimensions."""
    kl = torch.distributions.kl_divergence(before, after)
    return kl.reshape(kl.shape[0], -1).sum(1)


def surrogate_gain(
    before: Any, after: Any, actions: torch.Tensor, advantages: torch.Tensor
) -> float:
    """The change of the policy-gradient objective, ``mean(A·(log π_after − log π_before))``."""
    change = log_likelihood(after, actions) - log_likelihood(before, actions)
    return float((advantages * change).mean())


def efficiency(gain: float, kl: float) -> float:
    """Surrogate gain per unit of the step's length in the Fisher metric, ``gain / √(2·KL)``:
    for a small step d, ``gᵀd / √(dᵀFd)``, at most ``√(gᵀF⁻¹g)``, which the exact natural
    gradient attains. It depends on the step's direction, not on its size."""
    return gain / math.sqrt(2.0 * kl) if kl > 0.0 else math.nan


def policy_gradient(
    policy: Any, observations: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """``∇ mean(A·log π(a|s))`` of the batch at the policy's parameters, per parameter."""
    parameters = [p for p in policy.parameters() if p.requires_grad]
    with torch.enable_grad():
        distribution, _ = distribution_and_values(policy, observations)
        objective = (advantages * log_likelihood(distribution, actions)).mean()
        found = torch.autograd.grad(objective, parameters, allow_unused=True)
    return {
        p: torch.zeros_like(p) if g is None else g for p, g in zip(parameters, found, strict=True)
    }


def probe(
    policy: Any,
    direction: dict[torch.Tensor, torch.Tensor],
    observations: torch.Tensor,
    actions: torch.Tensor,
    advantages: torch.Tensor,
    before: Any,
    kl: float,
) -> tuple[float, float]:
    """A step along ``direction`` from the parameters the policy holds (those of
    ``before``), scaled until it moves the policy by ``kl``: the surrogate gain and the
    measured KL of that step. The parameters are left as they were."""
    if not kl > 0.0:
        return math.nan, math.nan
    start = [p.detach().clone() for p in direction]
    norm = math.sqrt(sum(float(d.square().sum()) for d in direction.values()))
    scale, gain, step_kl = 1e-3 / max(norm, 1e-12), 0.0, 0.0
    for _ in range(6):  # the KL grows as the scale squared while the step is small
        assign(direction, [p0 + scale * d for p0, d in zip(start, direction.values(), strict=True)])
        with torch.no_grad():
            after, _ = distribution_and_values(policy, observations)
        step_kl = float(per_example_kl(before, after).mean())
        gain = surrogate_gain(before, after, actions, advantages)
        if step_kl > 0.0 and abs(step_kl / kl - 1.0) < 0.05:
            break
        scale *= math.sqrt(kl / step_kl) if step_kl > 0.0 else 10.0
    assign(direction, start)
    return gain, step_kl


@torch.no_grad()
def assign(parameters: Any, values: list[torch.Tensor]) -> None:
    """Set each parameter (an iterable of them) to its value, in order."""
    for p, value in zip(parameters, values, strict=True):
        p.copy_(value)


def kfac_direction(
    optimizer: Any, gradient: dict[torch.Tensor, torch.Tensor]
) -> dict[torch.Tensor, torch.Tensor] | None:
    """The optimizer's ``(F̂ + λI)⁻¹`` applied to ``gradient`` (none where it fails)."""
    params = optimizer.param_groups[0]["params"]
    found = optimizer.natural_gradient([gradient.get(p) for p in params])
    if found is None:
        return None
    return {p: d for p, d in zip(params, found, strict=True) if d is not None}


def natural_gradient(
    policy: Any,
    observations: torch.Tensor,
    gradient: dict[torch.Tensor, torch.Tensor],
    before: Any,
    steps: int = CG_STEPS,
    damping: float = CG_DAMPING,
) -> dict[torch.Tensor, torch.Tensor]:
    """``(F + damping·I)⁻¹ g`` by ``steps`` of conjugate gradient on the batch's exact Fisher,
    the Hessian of ``mean KL(π_before ‖ π_θ)`` at the policy's parameters (those of
    ``before``)."""
    parameters = list(gradient)
    with torch.enable_grad():
        after, _ = distribution_and_values(policy, observations)
        kl = per_example_kl(before, after).mean()
        product = fisher_vector_product(kl, parameters, damping)
        flat = torch.cat([g.reshape(-1) for g in gradient.values()])
        direction = conjugate_gradient(product, flat, steps)
    pieces = direction.split([p.numel() for p in parameters])
    return {p: d.view_as(p) for p, d in zip(parameters, pieces, strict=True)}


def trace(
    model: Any, updates: int, solver: tuple[int, float] | None = None, held_out: bool = False
) -> list[dict[str, Any]]:
    """Train ``updates`` updates, recording each update's effect on the policy and values,
    and for ACKTR each K-FAC update's trust region; with ``solver = (steps, damping)``
    also the direction of :func:`natural_gradient`; with ``held_out``, the probes fitted
    to one half of each batch and measured on the other."""
    policy, optimizer = model.policy, model.policy.optimizer
    kfac = isinstance(model, ACKTR)
    rows: list[dict[str, Any]] = []
    quadratic, train = getattr(optimizer, "_quadratic", None), model.train
    # The policy's own parameters (a Gaussian policy's log_std) form the layer named "".
    own = ",".join(name for name, _ in policy.named_parameters(recurse=False)) or "<policy>"

    def recording_quadratic(directions: dict[str, torch.Tensor], grads: dict[str, Any]) -> Any:
        total = quadratic(directions, grads)
        if total is not None:
            quadratics = {
                name or own: float((directions[name] * g).sum()) for name, g in grads.items()
            }
            rows.append({"quadratics": quadratics})
        return total

    def recording_train() -> None:
        observations = (
            torch.as_tensor(model.rollout_buffer.observations)
            .reshape(-1, *model.observation_space.shape)
            .to(policy.device)
        )
        buffer = model.rollout_buffer
        actions = torch.as_tensor(buffer.actions).reshape(len(observations), -1)
        advantages = torch.as_tensor(buffer.advantages).reshape(-1)
        with torch.no_grad():
            # SB3 reuses one Distribution wrapper per policy: keep its torch distribution.
            before, values_before = distribution_and_values(policy, observations)
        start = [p.detach().clone() for p in policy.parameters()]
        count = len(rows)
        train()
        if kfac and len(rows) == count:  # a cold-start update: no K-FAC step
            return
        with torch.no_grad():
            after, values_after = distribution_and_values(policy, observations)
            kl = float(per_example_kl(before, after).mean())
            gain = surrogate_gain(before, after, actions, advantages)
        end = [p.detach().clone() for p in policy.parameters()]
        assign(policy.parameters(), start)  # the probes start where the step started
        everything = torch.arange(len(observations))
        fit, measure = everything, everything
        if held_out:
            order = torch.randperm(
                len(observations), generator=torch.Generator().manual_seed(model._n_updates)
            )
            fit, measure = order[: len(order) // 2], order[len(order) // 2 :]
        gradient = policy_gradient(policy, observations[fit], actions[fit], advantages[fit])
        probes = {"gradient": gradient}
        if solver is not None:
            probes["natural_gradient"] = natural_gradient(
                policy, observations[fit], gradient, rows_of(before, fit), *solver
            )
        if kfac:
            # The gradient of the update's whole loss (policy, value, entropy), uphill:
            # the whole batch's, so it has no held-out figure.
            loss_gradient = {p: -p.grad for p in policy.parameters() if p.grad is not None}
            probes["kfac_gradient"] = kfac_direction(optimizer, gradient)
            probes["kfac_loss_gradient"] = (
                None if held_out else kfac_direction(optimizer, loss_gradient)
            )
        measured = {}
        on = (observations[measure], actions[measure], advantages[measure])
        for name, direction in probes.items():
            gain_kl = (
                probe(policy, direction, *on, rows_of(before, measure), kl)
                if direction is not None
                else (math.nan, math.nan)
            )
            measured[f"{name}_gain"], measured[f"{name}_kl"] = gain_kl
            measured[f"{name}_efficiency"] = efficiency(*gain_kl)
        assign(policy.parameters(), end)
        effect = dict(
            update=model._n_updates,
            policy_kl=kl,
            value_rms_change=float((values_after - values_before).square().mean().sqrt()),
            entropy=float(after.entropy().reshape(len(observations), -1).sum(1).mean()),
            gain=gain,
            efficiency=efficiency(gain, kl),
            **measured,
        )
        if not kfac:
            rows.append(effect)
            return
        # One preconditioned gradient per trust region (two parts with trust_region="split").
        parts = [part["quadratics"] for part in rows[count:]]
        del rows[count:]
        scales = optimizer.trust_region_scales
        lr = float(optimizer.hyperparameter("lr"))
        layers = dict.fromkeys(layer for part in parts for layer in part)
        rows.append(
            dict(
                quadratics={layer: sum(part.get(layer, 0.0) for part in parts) for layer in layers},
                nu=scales[0],
                **({"nu_value": scales[1]} if len(scales) > 1 else {}),
                predicted_kl=sum(
                    lr * lr * nu * nu * sum(part.values())
                    for nu, part in zip(scales, parts, strict=True)
                ),
                **effect,
            )
        )

    if kfac:
        optimizer._quadratic = recording_quadratic  # type: ignore[method-assign]
    model.train = recording_train  # type: ignore[method-assign]
    model.learn(updates * model.n_steps * model.n_envs, reset_num_timesteps=False)
    return [row for row in rows if "policy_kl" in row]


def resumed(algo: str, checkpoint: Path, gym_id: str, seed: int, overrides: dict[str, Any]) -> Any:
    """The ``algo`` model of an ``ngrl.train`` checkpoint, on fresh envs, with top-level
    hyperparameters changed (also in the restored optimizer's settings)."""
    metadata = read_run_metadata(checkpoint)
    if (metadata.get("algo"), metadata.get("env")) != (algo, gym_id):
        raise ValueError(
            f"--resume {checkpoint}: a {metadata.get('algo')} run on {metadata.get('env')}, "
            f"not {algo} on {gym_id}"
        )
    cls = algorithm_class(algo)
    # load() sets whatever it is given: only the algorithm's own arguments may change.
    arguments = inspect.signature(cls.__init__).parameters
    others = [key for key in overrides if key not in arguments or key in ("policy", "env")]
    if others:
        raise ValueError(
            f"--set with --resume changes {algo}'s own top-level arguments only, not {others} "
            "(run settings and nested options come from the checkpoint)"
        )
    model = cls.load(checkpoint, device="cpu", **overrides)
    env = make_vec_env(gym_id, model.n_envs, seed=seed)
    model.set_env(load_normalizer(checkpoint, env) if has_normalizer(checkpoint) else env)
    for group in model.policy.optimizer.param_groups:  # restored with the checkpoint's values
        group.update({k: v for k, v in overrides.items() if k in group})
    return model


def print_table(rows: list[dict[str, Any]], window: int) -> None:
    """Medians over windows of ``window`` updates (and the mean KL: a first-order agent's
    steps are heavy-tailed), as a Markdown table."""
    kfac = bool(rows) and "nu" in rows[0]
    split = kfac and "nu_value" in rows[0]  # trust_region="split": ν_π / ν_V
    exact = bool(rows) and "natural_gradient_efficiency" in rows[0]
    layers = list(rows[0]["quadratics"]) if kfac else []
    heads = ["updates"]
    if kfac:
        heads += ["ν_π / ν_V" if split else "ν", "predicted KL"]
    heads += ["measured policy KL", "mean policy KL", "value RMS change", "entropy"]
    heads += ["gain / √(2 KL)", "the gradient's"]
    heads += ["the natural gradient's"] if exact else []
    heads += ["the K-FAC gradient's", "the K-FAC loss gradient's"] if kfac else []
    heads += [f"{name} share" for name in layers]
    print("| " + " | ".join(heads) + " |")
    print("|---" * len(heads) + "|")
    for start in range(0, len(rows), window):
        part = rows[start : start + window]

        def median(key: str, part: list[dict[str, Any]] = part) -> float:
            values = [r[key] for r in part]
            return float(np.nanmedian(values)) if not np.isnan(values).all() else math.nan

        cells = [f"{part[0]['update']}–{part[-1]['update']}"]
        if kfac:
            nu = f"{median('nu'):.3g}" + (f" / {median('nu_value'):.3g}" if split else "")
            cells += [nu, f"{median('predicted_kl'):.2e}"]
        cells += [
            f"{median('policy_kl'):.2e}",
            f"{np.mean([r['policy_kl'] for r in part]):.2e}",
            f"{median('value_rms_change'):.3g}",
            f"{median('entropy'):.3f}",
            f"{median('efficiency'):.3g}",
            f"{median('gradient_efficiency'):.3g}",
        ]
        if exact:
            cells.append(f"{median('natural_gradient_efficiency'):.3g}")
        if kfac:
            cells += [
                f"{median('kfac_gradient_efficiency'):.3g}",
                f"{median('kfac_loss_gradient_efficiency'):.3g}",
            ]
        cells += [
            f"{np.median([r['quadratics'][n] / sum(r['quadratics'].values()) for r in part]):.1%}"
            for n in layers
        ]
        print("| " + " | ".join(cells) + " |")


def write_csv(rows: list[dict[str, Any]], out: Path) -> None:
    """Every traced update, one row each; a layer's quadratic as ``quadratic:NAME``."""
    flat = [
        {
            **{k: v for k, v in r.items() if k != "quadratics"},
            **{f"quadratic:{n}": q for n, q in r.get("quadratics", {}).items()},
        }
        for r in rows
    ]
    fields = list(dict.fromkeys(key for r in flat for key in r))
    with out.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=fields)
        writer.writeheader()
        writer.writerows(flat)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--algo",
        choices=ALGOS,
        default="acktr",
        help="acktr (default), or a2c: SB3's A2C, its measured steps only",
    )
    parser.add_argument("--env", required=True, help="environment short name or gymnasium id")
    parser.add_argument("--updates", type=int, default=60, help="updates to trace (default: 60)")
    parser.add_argument(
        "--window", type=int, default=20, help="updates per printed row (medians; default: 20)"
    )
    parser.add_argument("--preset", help="a named preset of --algo (e.g. acktr's baselines)")
    add_override_option(parser, "override a hyperparameter, as in ngrl.train")
    parser.add_argument(
        "--resume",
        type=Path,
        help="trace the updates that follow this checkpoint.zip of an --algo run on --env "
        "(its hyperparameters, with --set changing top-level ones such as kl_clip or "
        "trust_region)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument(
        "--natural-gradient",
        action="store_true",
        help="also probe the natural gradient's direction: conjugate gradient on the batch's "
        "exact Fisher-vector products (TRPO's direction with the defaults below)",
    )
    parser.add_argument(
        "--held-out",
        action="store_true",
        help="fit each probe's direction to a random half of the batch and measure it on "
        "the other half (default: the whole batch, in-sample)",
    )
    parser.add_argument(
        "--cg-steps",
        type=int,
        default=CG_STEPS,
        help=f"--natural-gradient's iterations (default: {CG_STEPS}, TRPO's)",
    )
    parser.add_argument(
        "--cg-damping",
        type=float,
        default=CG_DAMPING,
        help=f"--natural-gradient's damping (default: {CG_DAMPING}, TRPO's)",
    )
    parser.add_argument("--out", type=Path, help="write every traced update to this CSV")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        if args.updates < 1 or args.window < 1 or args.cg_steps < 1:
            raise ValueError("--updates, --window and --cg-steps must be >= 1")
        if not args.cg_damping >= 0.0:
            raise ValueError(f"--cg-damping must be >= 0, not {args.cg_damping}")
        spec = resolve(args.env)
        overrides = [parse_override(t) for t in args.overrides]
        config = resolve_config(args.algo, spec, overrides, args.preset)
        if args.out is not None and not args.out.parent.is_dir():
            raise ValueError(f"--out {args.out}: no folder {args.out.parent}")
    except ValueError as error:
        print(f"trace_acktr_steps: {error}", file=sys.stderr)
        return 2
    if args.resume is not None:
        try:
            model = resumed(args.algo, args.resume, spec.gym_id, args.seed, dict(overrides))
        except (CheckpointError, ValueError) as error:
            print(f"trace_acktr_steps: {error}", file=sys.stderr)
            return 2
    else:
        env = make_vec_env(spec.gym_id, config.n_envs, seed=args.seed)
        model = algorithm_class(args.algo)(
            config.policy, env, seed=args.seed, device="cpu", **config.algorithm_kwargs()
        )
    if args.held_out and not isinstance(model.action_space, (spaces.Discrete, spaces.Box)):
        model.env.close()
        print(
            f"trace_acktr_steps: --held-out takes Discrete and Box action spaces (categorical "
            f"and normal policies), not {model.action_space}",
            file=sys.stderr,
        )
        return 2
    solver = (args.cg_steps, args.cg_damping) if args.natural_gradient else None
    rows = trace(model, args.updates, solver, args.held_out)
    print_table(rows, args.window)
    if args.out is not None:
        write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
