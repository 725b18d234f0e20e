"""Does ACKTR's step move the policy as its trust region intends? A trace of the first updates.

Trains ACKTR with a preset (and ``--set`` overrides) for a number of updates and records,
for every K-FAC update: the trust-region scale ``ν``, each layer's share of the quadratic
``Σ⟨X, ∇⟩``, the **measured** KL between the policy before and after the update on the
update's own batch, and the RMS change of the value prediction there. Prints medians over
windows of updates, and writes every update to ``--out`` (CSV) if given.

    python scripts/trace_acktr_steps.py --env Breakout --updates 60
    python scripts/trace_acktr_steps.py --env Breakout --updates 60 --set curvature=ekfac
    python scripts/trace_acktr_steps.py --env Breakout --updates 20 \
        --resume runs/acktr_Breakout/checkpoint.zip --set trust_region=split
"""

from __future__ import annotations

import argparse
import csv
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ngrl.agents import ACKTR
from ngrl.agents.checkpoints import (
    CheckpointError,
    has_normalizer,
    load_normalizer,
    read_run_metadata,
)
from ngrl.agents.presets import resolve_config
from ngrl.envs import make_vec_env, resolve
from ngrl.helpers import add_override_option, parse_override


def trace(model: ACKTR, updates: int) -> list[dict[str, Any]]:
    """Train ``updates`` updates, recording each K-FAC update's trust region and effect."""
    policy, optimizer = model.policy, model.policy.optimizer
    rows: list[dict[str, Any]] = []
    quadratic, train = optimizer._quadratic, model.train

    def recording_quadratic(directions: dict[str, torch.Tensor], grads: dict[str, Any]) -> Any:
        total = quadratic(directions, grads)
        if total is not None:
            quadratics = {name: float((directions[name] * g).sum()) for name, g in grads.items()}
            rows.append({"quadratics": quadratics})
        return total

    def recording_train() -> None:
        observations = (
            torch.as_tensor(model.rollout_buffer.observations)
            .reshape(-1, *model.observation_space.shape)
            .to(policy.device)
        )
        with torch.no_grad():
            # SB3 reuses one Distribution wrapper per policy: keep its torch distribution.
            before = policy.distribution_and_values(observations)
            before, values_before = before[0].distribution, before[1]
        count = len(rows)
        train()
        if len(rows) == count:  # a cold-start update: no K-FAC step
            return
        with torch.no_grad():
            after, values_after = policy.distribution_and_values(observations)
            kl = torch.distributions.kl_divergence(before, after.distribution)
        # One preconditioned gradient per trust region (two parts with trust_region="split").
        parts = [part["quadratics"] for part in rows[count:]]
        del rows[count:]
        scales = optimizer.trust_region_scales
        lr = float(optimizer.hyperparameter("lr"))
        layers = dict.fromkeys(layer for part in parts for layer in part)
        rows.append(
            dict(
                quadratics={layer: sum(part.get(layer, 0.0) for part in parts) for layer in layers},
                update=model._n_updates,
                nu=scales[0],
                **({"nu_value": scales[1]} if len(scales) > 1 else {}),
                predicted_kl=sum(
                    lr * lr * nu * nu * sum(part.values())
                    for nu, part in zip(scales, parts, strict=True)
                ),
                policy_kl=float(kl.reshape(kl.shape[0], -1).sum(1).mean()),
                value_rms_change=float((values_after - values_before).square().mean().sqrt()),
                entropy=float(after.entropy().mean()),
            )
        )

    optimizer._quadratic = recording_quadratic  # type: ignore[method-assign]
    model.train = recording_train  # type: ignore[method-assign]
    model.learn(updates * model.n_steps * model.n_envs, reset_num_timesteps=False)
    return [row for row in rows if "policy_kl" in row]


def resumed(checkpoint: Path, gym_id: str, seed: int, overrides: dict[str, Any]) -> ACKTR:
    """The ACKTR of an ``ngrl.train`` checkpoint, on fresh envs, with top-level
    hyperparameters changed (also in the restored optimizer's settings)."""
    metadata = read_run_metadata(checkpoint)
    if (metadata.get("algo"), metadata.get("env")) != ("acktr", gym_id):
        raise ValueError(
            f"--resume {checkpoint}: a {metadata.get('algo')} run on {metadata.get('env')}, "
            f"not acktr on {gym_id}"
        )
    # ACKTR.load sets whatever it is given: only the algorithm's own arguments may change.
    arguments = inspect.signature(ACKTR.__init__).parameters
    others = [key for key in overrides if key not in arguments or key in ("policy", "env")]
    if others:
        raise ValueError(
            f"--set with --resume changes ACKTR's own top-level arguments only, not {others} "
            "(run settings and nested options come from the checkpoint)"
        )
    model = ACKTR.load(checkpoint, device="cpu", **overrides)
    env = make_vec_env(gym_id, model.n_envs, seed=seed)
    model.set_env(load_normalizer(checkpoint, env) if has_normalizer(checkpoint) else env)
    for group in model.policy.optimizer.param_groups:  # restored with the checkpoint's values
        group.update({k: v for k, v in overrides.items() if k in group})
    return model


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env", required=True, help="environment short name or gymnasium id")
    parser.add_argument("--updates", type=int, default=60, help="updates to trace (default: 60)")
    parser.add_argument(
        "--window", type=int, default=20, help="updates per printed row (medians; default: 20)"
    )
    parser.add_argument("--preset", help="a named ACKTR preset (e.g. baselines)")
    add_override_option(parser, "override a hyperparameter, as in ngrl.train")
    parser.add_argument(
        "--resume",
        type=Path,
        help="trace the updates that follow this checkpoint.zip of an acktr run on --env "
        "(its hyperparameters, with --set changing top-level ones such as kl_clip or "
        "trust_region)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--out", type=Path, help="write every traced update to this CSV")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        if args.updates < 1 or args.window < 1:
            raise ValueError("--updates and --window must be >= 1")
        spec = resolve(args.env)
        overrides = [parse_override(t) for t in args.overrides]
        config = resolve_config("acktr", spec, overrides, args.preset)
        if args.out is not None and not args.out.parent.is_dir():
            raise ValueError(f"--out {args.out}: no folder {args.out.parent}")
    except ValueError as error:
        print(f"trace_acktr_steps: {error}", file=sys.stderr)
        return 2
    if args.resume is not None:
        try:
            model = resumed(args.resume, spec.gym_id, args.seed, dict(overrides))
        except (CheckpointError, ValueError) as error:
            print(f"trace_acktr_steps: {error}", file=sys.stderr)
            return 2
    else:
        env = make_vec_env(spec.gym_id, config.n_envs, seed=args.seed)
        model = ACKTR(config.policy, env, seed=args.seed, device="cpu", **config.algorithm_kwargs())
    rows = trace(model, args.updates)
    layers = list(rows[0]["quadratics"]) if rows else []
    split = bool(rows) and "nu_value" in rows[0]  # trust_region="split": ν_π / ν_V
    print(
        f"| updates | {'ν_π / ν_V' if split else 'ν'} | predicted KL | measured policy KL | value RMS change | entropy | "
        + " | ".join(f"{name} share" for name in layers)
        + " |"
    )
    print("|---" * (6 + len(layers)) + "|")
    for start in range(0, len(rows), args.window):
        window = rows[start : start + args.window]

        def median(key: str, window: list[dict[str, Any]] = window) -> float:
            return float(np.median([r[key] for r in window]))

        shares = [
            float(np.median([r["quadratics"][n] / sum(r["quadratics"].values()) for r in window]))
            for n in layers
        ]
        print(
            f"| {window[0]['update']}–{window[-1]['update']} | {median('nu'):.3g}"
            + (f" / {median('nu_value'):.3g}" if split else "")
            + " | "
            f"{median('predicted_kl'):.2e} | {median('policy_kl'):.2e} | "
            f"{median('value_rms_change'):.3g} | {median('entropy'):.3f} | "
            + " | ".join(f"{s:.1%}" for s in shares)
            + " |"
        )
    if args.out is not None:
        with args.out.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(
                [
                    "update",
                    "nu",
                    "nu_value",
                    "predicted_kl",
                    "policy_kl",
                    "value_rms_change",
                    "entropy",
                    *(f"quadratic:{n}" for n in layers),
                ]
            )
            for r in rows:
                writer.writerow(
                    [
                        r["update"],
                        r["nu"],
                        r.get("nu_value", ""),
                        r["predicted_kl"],
                        r["policy_kl"],
                        r["value_rms_change"],
                        r["entropy"],
                        *(r["quadratics"][n] for n in layers),
                    ]
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
