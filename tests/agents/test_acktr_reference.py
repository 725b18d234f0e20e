"""ACKTR against its published update, written anew here from the papers' formulas.

The reference (Wu et al. 2017, ACKTR; Grosse & Martens 2016, KFC; as openai/baselines and
ikostrikov's port implement them) on a small convolutional actor-critic with 16 spatial
positions, fed the same rollouts and the same sampled Fisher targets as ngrl's ACKTR:

* statistics from the backward pass of ``−log π(â|s) + c·(V(s) − v̂)²`` with
  ``â ~ π(·|s)``, ``v̂ = V(s) + ε``, ``ε ~ N(0, 1)``, per example;
* a dense layer: ``A = E[â âᵀ]`` with the bias as a homogeneous coordinate ``â = [a, 1]``,
  ``G = E[g gᵀ]``; a convolution (KFC): ``A = E[Σ_t â_t â_tᵀ]`` over the patches of the
  ``T`` output positions, ``G = E[(1/T) Σ_t g_t g_tᵀ]``;
* exponential moving averages with decay ``d`` (the first batch taken as is), the
  eigendecompositions refreshed every ``inv_update_steps`` updates;
* ``X = Q_G [(Q_Gᵀ ∇Ŵ Q_A) / (d_G d_Aᵀ + λ)] Q_Aᵀ`` (damping on the product of eigenvalues);
* ``ν = min(1, sqrt(δ / (lr² Σ⟨X, ∇Ŵ⟩)))``; TF's ``MomentumOptimizer(lr(1−μ), μ)``:
  ``acc ← μ·acc + ν·X`` from ``acc = 0``, ``Ŵ ← Ŵ − lr(1−μ)·acc``.

ngrl's parameters after its first and its tenth update equal the reference's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import RolloutBufferSamples
from stable_baselines3.common.vec_env import DummyVecEnv
from torch import Tensor, nn

from ngrl.agents import ACKTR
from ngrl.agents.policies import KFACActorCriticPolicy

LR, KL_CLIP, DAMPING, MOMENTUM, DECAY, INV_EVERY, VF_FISHER = 0.25, 1e-3, 1e-2, 0.9, 0.99, 4, 1.0
VF_COEF, ENT_COEF = 0.5, 0.01


class TinyImages(gym.Env):
    """Random 10×10 grey frames, 3 actions, a reward that depends on action and frame."""

    observation_space = gym.spaces.Box(0, 255, (1, 10, 10), np.uint8)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple:
        super().reset(seed=seed)
        self._t = 0
        self._frame = self.np_random.integers(0, 256, (1, 10, 10), dtype=np.uint8)
        return self._frame, {}

    def step(self, action: int) -> tuple:
        reward = float(self._frame[0, action, action] > 127) - 0.3 * action
        self._t += 1
        self._frame = self.np_random.integers(0, 256, (1, 10, 10), dtype=np.uint8)
        return self._frame, reward, False, self._t >= 7, {}


class SmallCNN(BaseFeaturesExtractor):
    """Conv 3×3 stride 2 (4×4 = 16 output positions), then a dense layer."""

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, features_dim=8)
        self.conv = nn.Conv2d(1, 3, kernel_size=3, stride=2)
        self.dense = nn.Linear(3 * 4 * 4, 8)

    def forward(self, obs: Tensor) -> Tensor:
        return torch.relu(self.dense(torch.relu(self.conv(obs)).flatten(1)))


def _make_acktr() -> ACKTR:
    env = DummyVecEnv([TinyImages for _ in range(4)])
    return ACKTR(
        KFACActorCriticPolicy,
        env,
        learning_rate=LR,
        n_steps=5,
        kl_clip=KL_CLIP,
        damping=DAMPING,
        momentum=MOMENTUM,
        factor_decay=DECAY,
        inv_update_steps=INV_EVERY,
        vf_fisher_coef=VF_FISHER,
        vf_coef=VF_COEF,
        ent_coef=ENT_COEF,
        cold_start_steps=0,
        kfac_kwargs={"weight_sharing": "expand"},
        policy_kwargs={"features_extractor_class": SmallCNN, "net_arch": []},
        seed=3,
        device="cpu",
    )


def _record_updates(model: ACKTR, updates: int) -> list[dict[str, Any]]:
    """Run ``updates`` ACKTR updates; for each, the rollout, the RNG state at which the
    Fisher targets were drawn, and the parameters after it."""
    records: list[dict[str, Any]] = []
    policy, buffer = model.policy, model.rollout_buffer
    capture, train, batches = policy.capture_fisher, model.train, buffer.get

    def recording_capture(*args: Any, **kwargs: Any) -> None:
        records[-1]["rng"] = torch.get_rng_state()
        capture(*args, **kwargs)

    def recording_batches(batch_size: int | None = None) -> Iterator[RolloutBufferSamples]:
        for samples in batches(batch_size):  # the one full batch, in the order train() sees
            records.append(
                {
                    "obs": samples.observations.clone(),
                    "actions": samples.actions.reshape(-1).long(),
                    "returns": samples.returns.clone(),
                    "advantages": samples.advantages.clone(),
                }
            )
            yield samples

    def recording_train() -> None:
        train()
        records[-1]["after"] = {k: v.clone() for k, v in policy.state_dict().items()}

    buffer.get = recording_batches  # type: ignore[method-assign]
    policy.capture_fisher = recording_capture  # type: ignore[method-assign]
    model.train = recording_train  # type: ignore[method-assign]
    model.learn(total_timesteps=updates * model.n_steps * model.n_envs)
    return records


class Reference:
    """The published ACKTR update on a float64 copy of the policy."""

    def __init__(self, policy: KFACActorCriticPolicy) -> None:
        self.extractor = SmallCNN(policy.observation_space)
        self.extractor.load_state_dict(policy.features_extractor.state_dict())
        self.action_net, self.value_net = nn.Linear(8, 3), nn.Linear(8, 1)
        self.action_net.load_state_dict(policy.action_net.state_dict())
        self.value_net.load_state_dict(policy.value_net.state_dict())
        self.layers: dict[str, nn.Module] = {
            "conv": self.extractor.conv,
            "dense": self.extractor.dense,
            "action": self.action_net,
            "value": self.value_net,
        }
        for layer in self.layers.values():
            layer.double()
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}
        self.eigen: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self.accumulators: dict[str, Tensor] = {}
        self.updates = 0

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor, dict[str, tuple[Tensor, Tensor]]]:
        """Logits, values and each layer's (input, output), outputs retaining their grads."""
        seen: dict[str, tuple[Tensor, Tensor]] = {}
        handles = []
        for name, layer in self.layers.items():

            def hook(module: nn.Module, inputs: tuple, output: Tensor, name: str = name) -> None:
                output.retain_grad()
                seen[name] = (inputs[0], output)

            handles.append(layer.register_forward_hook(hook))
        features = self.extractor(obs.double() / 255.0)
        logits, values = self.action_net(features), self.value_net(features).flatten()
        for handle in handles:
            handle.remove()
        return logits, values, seen

    def statistics(self, name: str, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, G)`` of one batch from layer inputs ``x`` and per-example output grads ``g``."""
        n = x.shape[0]
        if name == "conv":
            conv = self.layers["conv"]
            patches = F.unfold(x, conv.kernel_size, stride=conv.stride)  # (N, C·k·k, T)
            positions = patches.shape[-1]
            a = torch.cat([patches, torch.ones(n, 1, positions, dtype=x.dtype)], 1)
            a = a.transpose(1, 2).reshape(-1, a.shape[1])
            g = g.reshape(n, g.shape[1], -1).transpose(1, 2).reshape(-1, g.shape[1])
            return a.T @ a / n, g.T @ g / (n * positions)
        a = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
        return a.T @ a / n, g.T @ g / n

    def gradient(self, name: str) -> Tensor:
        layer = self.layers[name]
        return torch.cat(
            [layer.weight.grad.reshape(layer.weight.shape[0], -1), layer.bias.grad[:, None]], 1
        )

    def update(self, record: dict[str, Any]) -> None:
        obs = record["obs"]
        logits, values, seen = self.forward(obs)
        # 1. the sampled Fisher loss, drawn from the generator state ngrl drew from
        torch.set_rng_state(record["rng"])
        policy = torch.distributions.Categorical(logits=logits)
        sampled_actions = policy.sample()
        noise = torch.randn(values.shape, dtype=torch.float32).double()
        fisher = (
            -policy.log_prob(sampled_actions)
            + VF_FISHER * (values - (values.detach() + noise)).square()
        )
        self.zero_grad()
        fisher.sum().backward(retain_graph=True)  # per-example output gradients
        for name, (x, out) in seen.items():
            batch = self.statistics(name, x.detach(), out.grad.detach())
            old = self.factors.get(name)
            self.factors[name] = (
                batch
                if old is None
                else tuple(DECAY * o + (1 - DECAY) * b for o, b in zip(old, batch, strict=True))
            )
            out.grad = None
        # 2. the A2C loss's gradient
        self.zero_grad()
        log_prob = policy.log_prob(record["actions"])
        loss = (
            -(record["advantages"].double() * log_prob).mean()
            - ENT_COEF * policy.entropy().mean()
            + VF_COEF * (record["returns"].double() - values).square().mean()
        )
        loss.backward()
        # 3. the natural gradient, the trust region, TF's momentum
        if self.updates % INV_EVERY == 0:
            for name, (a_factor, g_factor) in self.factors.items():
                self.eigen[name] = (*torch.linalg.eigh(a_factor), *torch.linalg.eigh(g_factor))
        naturals, quadratic = {}, 0.0
        for name in self.layers:
            d_a, q_a, d_g, q_g = self.eigen[name]
            grad = self.gradient(name)
            x = q_g @ ((q_g.T @ grad @ q_a) / (torch.outer(d_g, d_a) + DAMPING)) @ q_a.T
            naturals[name] = x
            quadratic += float((x * grad).sum())
        nu = min(1.0, (KL_CLIP / (LR**2 * quadratic)) ** 0.5)
        with torch.no_grad():
            for name, layer in self.layers.items():
                acc = MOMENTUM * self.accumulators.get(name, 0.0) + nu * naturals[name]
                self.accumulators[name] = acc
                step = LR * (1 - MOMENTUM) * acc
                layer.weight -= step[:, :-1].reshape(layer.weight.shape)
                layer.bias -= step[:, -1]
        self.updates += 1

    def zero_grad(self) -> None:
        for layer in self.layers.values():
            layer.zero_grad()

    def parameters(self) -> dict[str, Tensor]:
        """The policy's parameters, under the policy's ``state_dict`` names."""
        prefixes = {
            "conv": "features_extractor.conv",
            "dense": "features_extractor.dense",
            "action": "action_net",
            "value": "value_net",
        }
        return {
            f"{prefixes[name]}.{key}": value.detach().clone()
            for name, layer in self.layers.items()
            for key, value in layer.state_dict().items()
        }


def test_first_and_tenth_acktr_updates_equal_the_published_update() -> None:
    model = _make_acktr()
    reference = Reference(model.policy)
    records = _record_updates(model, updates=10)
    assert len(records) == 10
    for index, record in enumerate(records):
        before = reference.parameters()
        reference.update(record)
        if index not in (0, 9):
            continue
        for key, expected in reference.parameters().items():
            moved = float((expected - before[key]).abs().max())
            assert moved > 1e-5, f"update {index + 1}: {key} did not move"
            torch.testing.assert_close(
                record["after"][key].double(),
                expected,
                rtol=1e-5,
                atol=1e-7,
                msg=lambda m, k=key, i=index: f"update {i + 1}, {k}: {m}",
            )
