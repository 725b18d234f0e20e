"""Who fills ACKTR's trust region? The quadratic Σ⟨X, ∇⟩ split into policy and value parts.

Loads a saved ACKTR model, collects one rollout with its own settings, and preconditions
the gradient of the policy loss (with the entropy bonus) and of the value loss separately
with the model's K-FAC factors, at several dampings. Since ``X = (F̂ + λI)⁻¹∇`` is linear
in ``∇``, the two parts say which loss sets the trust-region scale ``ν``. It also prints,
per layer, how much of the Kronecker spectrum ``d_G d_Aᵀ`` lies above the damping.

    python -m ngrl.train acktr --env Breakout --timesteps 100000 --log-dir runs/brk
    python scripts/diagnose_trust_region.py runs/brk/checkpoint.zip --env Breakout
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch
from torch import Tensor

from ngrl.agents import ACKTR
from ngrl.envs import make_vec_env


def layer_gradients(model: ACKTR, data: object, part: str) -> dict[str, Tensor]:
    """Each layer's gradient (block view) of the policy or the value part of ACKTR's loss."""
    policy, optimizer = model.policy, model.policy.optimizer
    distribution, values = policy.distribution_and_values(data.observations)
    terms = model.a2c_loss_terms(distribution, values.flatten(), data)
    if part == "policy":
        loss = terms.policy + model.ent_coef * terms.entropy
    else:
        loss = model.vf_coef * terms.value
    optimizer.zero_grad()
    loss.backward()
    return {
        layer.name: layer.gather([p.grad for p in layer.params]).clone()
        for layer in optimizer.layers
        if any(p.grad is not None for p in layer.params)
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "model",
        help="an ACKTR checkpoint.zip written by ngrl.train (its "
        "K-FAC factors; model.zip holds the policy only)",
    )
    parser.add_argument("--env", required=True, help="the environment it was trained on")
    parser.add_argument("--seed", type=int, default=123, help="rollout seed (default: 123)")
    parser.add_argument(
        "--dampings",
        default="1e-2,1e-4,1e-6",
        help="comma-separated dampings to split the quadratic at",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    try:
        dampings = [float(d) for d in args.dampings.split(",")]
        model = ACKTR.load(args.model)
    except (ValueError, OSError) as error:
        print(f"diagnose_trust_region: {error}", file=sys.stderr)
        return 2
    model.set_env(make_vec_env(args.env, model.n_envs, seed=args.seed))
    _, callback = model._setup_learn(10**9, callback=None)
    callback.on_training_start(locals(), globals())
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    data = next(model.rollout_buffer.get(batch_size=None))
    parts = {part: layer_gradients(model, data, part) for part in ("policy", "value")}
    optimizer = model.policy.optimizer
    print(
        f"advantages std {float(data.advantages.std()):.4g}, returns std "
        f"{float(data.returns.std()):.4g}"
    )
    print("| damping | policy Σ⟨X,∇⟩ | value Σ⟨X,∇⟩ | value / policy |\n|---|---|---|---|")
    for damping in dampings:
        totals = dict.fromkeys(parts, 0.0)
        for layer in optimizer.layers:
            block = optimizer.blocks[layer.name]
            if not block.initialized:
                continue
            block.refresh(damping)
            for part, grads in parts.items():
                if layer.name in grads:
                    x = block.precondition(grads[layer.name], damping)
                    totals[part] += float((x * grads[layer.name]).sum())
        print(
            f"| {damping:g} | {totals['policy']:.4g} | {totals['value']:.4g} | "
            f"{totals['value'] / totals['policy']:.3g} |"
        )
    norms = {
        p: sum(float(g.square().sum()) for g in grads.values()) ** 0.5 for p, grads in parts.items()
    }
    print(f"gradient norms: policy {norms['policy']:.4g}, value {norms['value']:.4g}")
    print("| layer | largest d_G·d_A | share of d_G·d_A above 1e-2 | median |\n|---|---|---|---|")
    for layer in optimizer.layers:
        block = optimizer.blocks[layer.name]
        if getattr(block, "a_factor", None) is None or not block.initialized:
            continue
        products = torch.outer(
            torch.linalg.eigvalsh(block.g_factor.double()),
            torch.linalg.eigvalsh(block.a_factor.double()),
        ).flatten()
        print(
            f"| {layer.name} | {float(products.max()):.3g} | "
            f"{float((products > 1e-2).double().mean()):.3g} | {float(products.median()):.3g} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
