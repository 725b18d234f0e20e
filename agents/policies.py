"""SB3 actor-critic policies whose optimizer is ngrl's K-FAC.

The policies are Stable-Baselines3 ``ActorCriticPolicy`` subclasses, so they run inside
ngrl's ACKTR and inside SB3's own A2C and PPO. K-FAC needs the modules (for its hooks), not
just their parameters, so it is installed in :meth:`KFACActorCriticPolicy._build`.

Inside an algorithm that knows nothing of K-FAC (SB3's A2C and PPO), the curvature
statistics are taken automatically: :meth:`~KFACActorCriticPolicy.evaluate_actions`, which
those algorithms call with gradients on right before their loss, captures the sampled
Fisher loss whenever the optimizer's ``capture_due`` says so.
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import CombinedExtractor, NatureCNN
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import Tensor

from ngrl import KFAC, fisher_divergence, fisher_loss
from ngrl.optim import KFACConfig

__all__ = [
    "ACTION_SPACES",
    "CRITIC_PREFIXES",
    "KFACOptimized",
    "KFACActorCriticCnnPolicy",
    "KFACActorCriticPolicy",
    "KFACMultiInputActorCriticPolicy",
    "CnnPolicy",
    "MlpPolicy",
    "MultiInputPolicy",
    "actor_layer_patterns",
    "critic_layer_patterns",
    "is_critic",
]

#: The action spaces of SB3's distributions, which the policies and algorithms support.
ACTION_SPACES: tuple[type[spaces.Space], ...] = (
    spaces.Box,
    spaces.Discrete,
    spaces.MultiDiscrete,
    spaces.MultiBinary,
)


#: Module names of the critic in SB3's and sb3-contrib's actor-critic policies (their
#: children included); every other module belongs to the actor or is shared.
CRITIC_PREFIXES = (
    "value_net",
    "mlp_extractor.value_net",
    "vf_features_extractor",
    "lstm_critic",
    "critic",
)


def is_critic(name: str) -> bool:
    """Whether the module or parameter ``name`` of a policy belongs to its critic."""
    return any(name == prefix or name.startswith(f"{prefix}.") for prefix in CRITIC_PREFIXES)


def critic_layer_patterns() -> list[str]:
    """``skip_layers`` patterns of :class:`ngrl.optim.KFAC` that leave the critic out."""
    critic = "|".join(re.escape(prefix) for prefix in CRITIC_PREFIXES)
    return [rf"^(?:{critic})(?:\.|$)"]


def actor_layer_patterns(policy: torch.nn.Module) -> list[str]:
    """``skip_layers`` patterns of :class:`ngrl.optim.KFAC` that leave out every module of
    ``policy`` with parameters of its own outside the critic (the actor and shared ones)."""
    return [
        rf"^{re.escape(name)}$"
        for name, module in policy.named_modules()
        if not is_critic(name) and any(True for _ in module.parameters(recurse=False))
    ]


def first_rows(obs: PyTorchObs, size: int) -> PyTorchObs:
    """The first ``size`` examples of a batch of observations (a tensor or a dict of them)."""
    if isinstance(obs, dict):
        return {key: value[:size] for key, value in obs.items()}
    return obs[:size]


class KFACOptimized:
    """What makes an SB3 actor-critic policy K-FAC's: the optimizer built on its modules
    and the statistics of ACKTR's Fisher (Wu et al. 2017), for the feedforward
    (:class:`KFACActorCriticPolicy`) and the recurrent
    (:class:`ngrl.agents.recurrent.KFACRecurrentActorCriticPolicy`) policies.

    The Fisher is that of the joint model ``p(a, v | s) = π(a | s) · N(v; V(s), 1/(4c²))``:
    its statistics come from the backward pass of ``−log π(â|s) + c·(V(s) − v̂)²`` with
    ``â ~ π(·|s)``, ``v̂ ~ N(V(s), 1)`` and ``c = vf_fisher_coef``, the value term exactly
    as openai/baselines and ikostrikov's port write it (so ``c = 1`` gives their value
    Fisher). Continuous actions use SB3's diagonal Gaussian with a state-independent log
    standard deviation (a parameter of the policy, which gets a diagonal curvature block).

    Args:
        observation_space, action_space, lr_schedule: as for SB3's policies.
        kfac_config: the :class:`ngrl.optim.KFACConfig` of the optimizer (its ``lr``
            follows ``lr_schedule`` and the algorithm); ACKTR passes its own.
        kfac_kwargs: the same as keyword arguments of :class:`ngrl.optim.KFAC`, for use
            inside SB3's algorithms (``policy_kwargs=dict(kfac_kwargs={...})``).
        vf_fisher_coef: weight ``c`` of the value head's Gaussian term in the Fisher loss.
        **kwargs: the other arguments of the SB3 policy. ``optimizer_class`` and
            ``optimizer_kwargs`` are ignored with a warning: K-FAC is this policy's
            optimizer (SB3's A2C passes RMSprop unless ``use_rms_prop=False``).
    """

    optimizer: KFAC
    action_dist: Distribution

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *args: Any,
        kfac_config: KFACConfig | None = None,
        kfac_kwargs: dict[str, Any] | None = None,
        vf_fisher_coef: float = 1.0,
        **kwargs: Any,
    ) -> None:
        ignored = kwargs.pop("optimizer_class", None)
        ignored_kwargs = kwargs.pop("optimizer_kwargs", None)
        if (ignored is not None and ignored is not KFAC) or ignored_kwargs:
            name = getattr(ignored, "__name__", ignored)
            warnings.warn(
                f"{type(self).__name__}: optimizer_class={name} and optimizer_kwargs="
                f"{ignored_kwargs} are ignored; K-FAC is this policy's optimizer (set its "
                "options with kfac_kwargs; with SB3's A2C pass use_rms_prop=False)",
                UserWarning,
                stacklevel=2,
            )
        if kfac_config is not None and kfac_kwargs:
            raise ValueError("Invalid K-FAC options: give kfac_config or kfac_kwargs, not both")
        self.kfac_config = kfac_config or KFACConfig.from_options(**(kfac_kwargs or {}))
        self.vf_fisher_coef = float(vf_fisher_coef)
        super().__init__(observation_space, action_space, lr_schedule, *args, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        # SB3 builds `optimizer_class(self.parameters(), ...)` at the end of `_build`; K-FAC
        # needs the module itself, so a throw-away SGD (no state) stands in and is replaced.
        self.optimizer_class, self.optimizer_kwargs = torch.optim.SGD, {}
        super()._build(lr_schedule)
        self.install_kfac(lr_schedule)

    def install_kfac(self, lr_schedule: Schedule) -> None:
        """Make K-FAC on every module of the policy its optimizer (again, after modules
        were added: the earlier optimizer's hooks are removed)."""
        previous = getattr(self, "optimizer", None)
        if isinstance(previous, KFAC):
            previous.remove_hooks()
        self.optimizer = KFAC.from_config(self, self.kfac_config.replace(lr=lr_schedule(1)))

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.pop("optimizer_class", None)
        data.pop("optimizer_kwargs", None)
        data.update(kfac_config=self.kfac_config, vf_fisher_coef=self.vf_fisher_coef)
        return data

    def capture_fisher(
        self,
        distribution: Distribution,
        values: Tensor,
        vf_fisher_coef: float | None = None,
        obs: PyTorchObs | None = None,
    ) -> None:
        """Feed K-FAC the statistics of the sampled Fisher loss of this forward pass.

        The graph is kept, so the training loss can be backpropagated afterwards. Given
        the pass's observations ``obs``, when K-FAC takes its statistics from fewer
        examples than the batch (``stats_batch_size``), those examples are forwarded again
        on their own: the statistics are the same, and their backward pass covers those
        examples instead of the whole batch.
        """
        size = self.optimizer.config.stats_batch_size
        if obs is not None and size is not None and size < values.shape[0]:
            # SB3 fills one distribution object per policy: the caller's stays as it was.
            shared = self.action_dist
            self.action_dist = copy.copy(shared)
            try:
                distribution, fewer = self.distribution_and_values(first_rows(obs, size))
            finally:
                self.action_dist = shared
            values = fewer.reshape(size, *values.shape[1:])
        # fisher_loss(..., "gaussian") is ½(V − v̂)²; baselines' term is c·(V − v̂)².
        value_weight = 2.0 * self._value_fisher_coef(vf_fisher_coef)
        loss = self._fisher_terms(fisher_loss, distribution, values, value_weight)
        self.capture_statistics(loss, rows=values.shape[0])

    def fisher_divergence(
        self, distribution: Distribution, values: Tensor, vf_fisher_coef: float | None = None
    ) -> Tensor:
        """The divergence whose Hessian is the Fisher that :meth:`capture_fisher` samples
        (:func:`ngrl.fisher_divergence` of the policy and, weighted alike, of the values):
        the exact curvature of ``KFAC(..., cg_steps=k)``'s ``step(divergence=...)``."""
        # The sampled loss's value term is scaled by 2c, so its Fisher by (2c)².
        value_weight = (2.0 * self._value_fisher_coef(vf_fisher_coef)) ** 2
        return self._fisher_terms(fisher_divergence, distribution, values, value_weight)

    def _value_fisher_coef(self, vf_fisher_coef: float | None) -> float:
        return self.vf_fisher_coef if vf_fisher_coef is None else vf_fisher_coef

    @staticmethod
    def _fisher_terms(
        term: Any, distribution: Distribution, values: Tensor, value_weight: float
    ) -> Tensor:
        """``term`` (:func:`ngrl.fisher_loss` or :func:`ngrl.fisher_divergence`) of the
        policy's distribution, plus ``value_weight`` times that of a unit-variance
        Gaussian on the values (none when the weight is 0)."""
        torch_distribution = distribution.distribution
        if isinstance(torch_distribution, list):  # MultiDiscrete: independent categoricals
            total = sum(term(d) for d in torch_distribution)
        else:
            total = term(torch_distribution)
        if value_weight != 0.0:
            total = total + value_weight * term(values, kind="gaussian")
        return total

    def capture_statistics(self, loss: Tensor, rows: int, optimizer: KFAC | None = None) -> None:
        """K-FAC's statistics from the backward pass of ``loss``, a mean over ``rows``
        examples (the graph is kept), for ``optimizer`` (default: the policy's)."""
        (optimizer or self.optimizer).capture_backward(loss)


class KFACActorCriticPolicy(KFACOptimized, ActorCriticPolicy):
    """SB3's actor-critic policy (MLP features) trained by :class:`ngrl.optim.KFAC`, with
    ACKTR's Fisher (:class:`KFACOptimized`).

    Inside an algorithm that knows nothing of K-FAC (SB3's A2C and PPO),
    :meth:`evaluate_actions` captures the statistics when they are due.
    """

    # --- one forward pass for everything a training step needs ----------------------------
    def distribution_and_values(self, obs: PyTorchObs) -> tuple[Distribution, Tensor]:
        """The action distribution and the values ``V(s)`` (shape ``(N, 1)``) in one pass."""
        features = self.extract_features(obs)
        if self.share_features_extractor:
            latent_pi, latent_vf = self.mlp_extractor(features)
        else:
            pi_features, vf_features = features
            latent_pi = self.mlp_extractor.forward_actor(pi_features)
            latent_vf = self.mlp_extractor.forward_critic(vf_features)
        return self._get_action_dist_from_latent(latent_pi), self.value_net(latent_vf)

    def evaluate_actions(
        self, obs: PyTorchObs, actions: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """SB3's ``evaluate_actions``; also captures K-FAC statistics when they are due.

        SB3's A2C and PPO call this with gradients enabled right before their loss, so the
        statistics come from the same forward pass as the gradient, as in ACKTR.
        """
        distribution, values = self.distribution_and_values(obs)
        if torch.is_grad_enabled() and self.optimizer.capture_due:
            self.capture_fisher(distribution, values, obs=obs)
        return values, distribution.log_prob(actions), distribution.entropy()


class KFACActorCriticCnnPolicy(KFACActorCriticPolicy):
    """:class:`KFACActorCriticPolicy` with SB3's Nature CNN features (images)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", NatureCNN)
        super().__init__(*args, **kwargs)


class KFACMultiInputActorCriticPolicy(KFACActorCriticPolicy):
    """:class:`KFACActorCriticPolicy` for dict observations (SB3's combined extractor)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", CombinedExtractor)
        super().__init__(*args, **kwargs)


# The names SB3 users type.
MlpPolicy = KFACActorCriticPolicy
CnnPolicy = KFACActorCriticCnnPolicy
MultiInputPolicy = KFACMultiInputActorCriticPolicy
