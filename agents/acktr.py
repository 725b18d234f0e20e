"""ACKTR: actor-critic with K-FAC trust-region steps, as a Stable-Baselines3 algorithm."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import (
    GymEnv,
    MaybeCallback,
    RolloutBufferSamples,
    Schedule,
)
from stable_baselines3.common.utils import LinearSchedule, explained_variance

from ngrl.agents.advantages import standardize
from ngrl.agents.checkpoints import PolicyOnlyLoading
from ngrl.agents.data_parallel import GlobalTimesteps
from ngrl.agents.policies import (
    ACTION_SPACES,
    CnnPolicy,
    KFACActorCriticPolicy,
    KFACOptimized,
    MlpPolicy,
    MultiInputPolicy,
    actor_layer_patterns,
    critic_layer_patterns,
    is_critic,
)
from ngrl.distributed import all_reduce_mean, average_gradients, broadcast_module, is_distributed
from ngrl.optim import KFAC, KFACConfig
from ngrl.optim.config import SCHEDULABLE
from ngrl.optim.hyperparams import check_choice, check_integer

__all__ = ["A2CLossTerms", "ACKTR"]


class A2CLossTerms(NamedTuple):
    """A2C's loss on a rollout, term by term (:meth:`ACKTR.a2c_loss_terms`)."""

    policy: torch.Tensor  # −mean(Â·log π(a|s))
    entropy: torch.Tensor  # −mean(H[π(·|s)])
    value: torch.Tensor  # mean((R − V(s))²)
    actions: torch.Tensor  # the rollout's actions, as the distribution takes them
    log_prob: torch.Tensor  # log π(a|s)


SelfACKTR = TypeVar("SelfACKTR", bound="ACKTR")

#: ACKTR's own arguments that are K-FAC options; the others come in ``kfac_kwargs``.
KFAC_ARGUMENTS = (
    "kl_clip",
    "damping",
    "momentum",
    "factor_decay",
    "factor_update_steps",
    "inv_update_steps",
    "curvature",
    "cg_steps",
)
#: The K-FAC options ACKTR sets itself (its own arguments, the schedule's lr, dampening =
#: momentum): never taken from ``kfac_kwargs``.
OWN_OPTIONS = frozenset({*KFAC_ARGUMENTS, "lr", "dampening"})
#: The critic's K-FAC with ``n_critic_updates``: openai/baselines' continuous-control value
#: function (``value_functions.py``: lr 1e-3, KL clip 0.3, damping 0.1, statistics decay
#: 0.95, momentum 0.9). Its statistics and inverses are refreshed once per update, on the
#: first of the ``n_critic_updates`` steps (baselines: statistics every step, inverses
#: every second): the batch is the same and the critic moves little within an update,
#: and on an LSTM critic the statistics' backward pass was a third of the update's time.
CRITIC_KFAC_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "kl_clip": 0.3,
    "damping": 0.1,
    "factor_decay": 0.95,
    "momentum": 0.9,
}


class KFACSetting:
    """An ACKTR attribute that names a field of its :class:`ngrl.optim.KFACConfig`.

    Reading gives the value in use: the optimizer's ``param_groups[0]`` once the policy
    exists (where schedules and SB3 change it), else the config. Assigning a value the
    optimizer reads at every step (``model.damping = 1e-3``) checks it and changes both;
    assigning one that fixed the optimizer's structure (``curvature``) after the policy
    exists raises ``AttributeError`` instead of silently doing nothing.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: ACKTR | None, owner: type | None = None) -> Any:
        if model is None:
            return self
        optimizer = model._kfac_optimizer()
        if optimizer is not None and self.name in SCHEDULABLE:
            return optimizer.param_groups[0][self.name]
        return getattr(model.kfac_config, self.name)

    def __set__(self, model: ACKTR, value: Any) -> None:
        optimizer = model._kfac_optimizer()
        if optimizer is not None and self.name not in SCHEDULABLE:
            raise AttributeError(
                f"ACKTR.{self.name} fixes the structure of the K-FAC optimizer and cannot "
                f"change after construction; build ACKTR(..., {self.name}=...) instead"
            )
        changes = {self.name: value}
        if self.name == "momentum":  # ACKTR's averaged momentum: dampening = momentum
            changes["dampening"] = value
        model.kfac_config = model.kfac_config.replace(**changes)  # checks the value
        if optimizer is not None:
            optimizer.param_groups[0].update(changes)
            if self.name == "momentum":
                model.cold_optimizer.param_groups[0].update(momentum=value, dampening=value)


class ACKTR(PolicyOnlyLoading, OnPolicyAlgorithm):
    r"""Actor Critic using Kronecker-Factored Trust Region (Wu et al. 2017, arXiv:1708.05144).

    A2C's loss, minimised by K-FAC natural-gradient steps inside a KL trust region. Per
    update, on a rollout of ``n_envs × n_steps`` transitions:

    .. code-block:: text

        1. statistics: backward of  −log π(â|s) + c·(V(s) − v̂)²,  â ~ π(·|s), v̂ ~ N(V(s), 1)
           inside opt.capture()  (the true Fisher of policy and value, c = vf_fisher_coef)
        2. gradient:   ∇ of  −Â·log π(a|s) + vf_coef·(R − V(s))² − ent_coef·H[π(·|s)]
        3. step:       X = (F̂ + λI)⁻¹∇,  ν = min(1, sqrt(kl_clip / (lr² Σ⟨X, ∇⟩))),
                       m ← μ·m + (1−μ)·ν·X,  θ ← θ − lr·m

    With ``trust_region="split"`` the policy part of the loss (policy and entropy terms)
    and the value part get one trust region each (:meth:`ngrl.optim.KFAC.step_parts`):
    ``d = ν_π X_π + ν_V X_V`` with ``ν_π`` from ``kl_clip`` and ``ν_V`` from
    ``value_kl_clip``, so that the critic's share of a joint quadratic cannot shrink the
    policy's step (one more backward pass per update).

    With ``n_critic_updates > 0`` the critic is fitted apart, as in the paper's
    continuous-control agent (openai/baselines ``acktr_cont``): the step above is taken on
    the policy part alone, with the actor's Fisher (the critic's modules left out of the
    policy's K-FAC), then ``n_critic_updates`` K-FAC steps of a second optimizer
    (:attr:`critic_optimizer`, options :data:`CRITIC_KFAC_DEFAULTS` updated by
    ``critic_kfac_kwargs``) minimise ``mean((R − V(s))²)`` on the rollout, preconditioned
    by the Gauss-Newton Fisher of the values (its statistics and inverses refreshed on the
    first of the steps). A trunk shared by actor and critic is moved by the policy step
    only.

    Under ``torchrun`` (a ``torch.distributed`` process group), each rank steps its own
    environments; the ranks start from rank 0's parameters, K-FAC averages gradients and
    statistics, and ``num_timesteps`` counts all ranks' steps (:mod:`ngrl.agents.data_parallel`).

    The first ``cold_start_steps`` updates are momentum-SGD steps (``m ← μ·m + (1−μ)·∇``
    after the first ``m = ∇``; ``θ ← θ − lr·m``) with gradient-norm clipping at
    ``max_grad_norm`` while the factors warm up (openai/baselines' ``cold_iter``). The
    defaults are the baselines Atari settings. With ``target_kl`` the learning rate adapts
    as in the paper's continuous-control recipe: divided by 1.5 when the measured KL of an
    update exceeds ``2·target_kl``, multiplied by 1.5 when it is below ``target_kl / 2``.

    Args:
        policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or a
            :class:`ngrl.agents.policies.KFACActorCriticPolicy` subclass.
        env: an SB3 ``VecEnv``, a gymnasium env or its id.
        learning_rate: ``lr`` (a float or a schedule of the remaining progress); the
            default decays linearly from 0.25 to 0.
        n_steps: steps per environment per update.
        gamma, gae_lambda: discount and GAE parameter (1.0: n-step returns, as in A2C).
        ent_coef, vf_coef: entropy and value-loss weights of the A2C loss.
        vf_fisher_coef: ``c``, the weight of the value head's Gaussian term in the Fisher.
        max_grad_norm: gradient-norm clip of the cold-start SGD steps.
        kl_clip, damping, momentum, factor_decay, factor_update_steps, inv_update_steps,
        curvature: :class:`ngrl.optim.KFAC` hyperparameters (``dampening`` is set to
            ``momentum``: ACKTR's averaged momentum).
        cg_steps: with ``k > 0``, each K-FAC step's ``X`` is refined by ``k`` iterations
            of conjugate gradient on the batch's exact Fisher (the Hessian of
            :meth:`~ngrl.agents.policies.KFACOptimized.fisher_divergence`), preconditioned
            by K-FAC: TRPO's direction at K-FAC's price plus ``k`` Hessian-vector products.
            Read at every step, like ``damping``: ``model.cg_steps = k`` starts (or stops)
            the refinement between updates.
        kfac_kwargs: other :class:`ngrl.optim.KFAC` options (``weight_sharing``,
            ``stats_batch_size``, ``curvature_options``, ...).
        cold_start_steps: momentum-SGD updates before the first K-FAC step.
        target_kl: KL target of the adaptive learning rate; ``None`` keeps the schedule.
        trust_region: ``"joint"`` (the paper's: one ν for the whole step) or ``"split"``
            (one for the policy part, one for the value part).
        value_kl_clip: the value part's radius under ``"split"`` (default: ``kl_clip``).
        n_critic_updates: K-FAC steps of the critic alone per update (0: the critic is
            trained by the joint A2C loss, as on Atari).
        critic_kfac_kwargs: :class:`ngrl.optim.KFAC` options of the critic's optimizer
            (over :data:`CRITIC_KFAC_DEFAULTS`, with statistics and inverses every
            ``n_critic_updates`` steps); only with ``n_critic_updates > 0``.
        normalize_advantage: standardise advantages per batch (off in the paper).
        The remaining arguments are SB3's ``OnPolicyAlgorithm`` arguments.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    policy: KFACActorCriticPolicy
    #: The policies this algorithm can train.
    policy_base: ClassVar[type[KFACOptimized]] = KFACActorCriticPolicy
    kl_clip = KFACSetting()
    damping = KFACSetting()
    momentum = KFACSetting()
    factor_decay = KFACSetting()
    factor_update_steps = KFACSetting()
    inv_update_steps = KFACSetting()
    curvature = KFACSetting()
    cg_steps = KFACSetting()

    def __init__(
        self,
        policy: str | type[KFACActorCriticPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = LinearSchedule(0.25, 0.0, 1.0),  # noqa: B008
        n_steps: int = 20,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        ent_coef: float = 0.01,
        vf_coef: float = 0.5,
        vf_fisher_coef: float = 1.0,
        max_grad_norm: float = 0.5,
        kl_clip: float | None = 1e-3,
        damping: float = 1e-2,
        momentum: float = 0.9,
        factor_decay: float = 0.99,
        factor_update_steps: int = 1,
        inv_update_steps: int = 10,
        curvature: str = "kfac",
        cg_steps: int = 0,
        kfac_kwargs: dict[str, Any] | None = None,
        cold_start_steps: int = 10,
        target_kl: float | None = None,
        trust_region: Literal["joint", "split"] = "joint",
        value_kl_clip: float | None = None,
        n_critic_updates: int = 0,
        critic_kfac_kwargs: dict[str, Any] | None = None,
        normalize_advantage: bool = False,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: torch.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        if isinstance(policy, type) and not issubclass(policy, self.policy_base):
            raise ValueError(self._invalid_policy(policy))
        if policy_kwargs and {"kfac_kwargs", "kfac_config"} & set(policy_kwargs):
            raise ValueError(
                "Invalid policy_kwargs: K-FAC options go to ACKTR(kfac_kwargs=...) or its "
                "named arguments, not to policy_kwargs"
            )
        taken = sorted(set(kfac_kwargs or {}) & OWN_OPTIONS)
        if taken:
            raise ValueError(
                f"Invalid kfac_kwargs: {', '.join(taken)} are set by ACKTR's own arguments "
                "(learning_rate, momentum, ...), not through kfac_kwargs"
            )
        #: Every K-FAC option of this agent, checked once; the policy's optimizer is built
        #: from it (its learning rate follows ``learning_rate``).
        self.kfac_config = KFACConfig.from_options(
            **(kfac_kwargs or {}),
            kl_clip=kl_clip,
            damping=damping,
            momentum=momentum,
            dampening=momentum,  # ACKTR's averaged momentum
            factor_decay=factor_decay,
            factor_update_steps=factor_update_steps,
            inv_update_steps=inv_update_steps,
            curvature=curvature,
            cg_steps=cg_steps,
        )
        check_integer("cold_start_steps", cold_start_steps, 0)
        if target_kl is not None and not target_kl > 0.0:
            raise ValueError(f"Invalid target_kl value: {target_kl!r} (> 0, or None)")
        check_choice("trust_region", trust_region, ("joint", "split"))
        if value_kl_clip is not None and not value_kl_clip > 0.0:
            raise ValueError(f"Invalid value_kl_clip value: {value_kl_clip!r} (> 0, or None)")
        check_integer("n_critic_updates", n_critic_updates, 0)
        if n_critic_updates and trust_region == "split":
            raise ValueError(
                "Invalid trust_region: 'split' divides the joint loss's step; with "
                "n_critic_updates > 0 the critic has its own optimizer (use 'joint')"
            )
        if critic_kfac_kwargs and not n_critic_updates:
            raise ValueError("Invalid critic_kfac_kwargs: they need n_critic_updates > 0")
        #: The options of the critic's K-FAC (with ``n_critic_updates``), checked once.
        once_per_update = max(n_critic_updates, 1)
        self.critic_kfac_config = KFACConfig.from_options(
            **{
                **CRITIC_KFAC_DEFAULTS,
                "factor_update_steps": once_per_update,
                "inv_update_steps": once_per_update,
                **(critic_kfac_kwargs or {}),
            }
        )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            device=device,
            seed=seed,
            _init_setup_model=False,
            supported_action_spaces=ACTION_SPACES,
        )
        self.vf_fisher_coef = vf_fisher_coef
        self.cold_start_steps = cold_start_steps
        self.target_kl = target_kl
        self.trust_region = trust_region
        self.value_kl_clip = value_kl_clip
        self.n_critic_updates = n_critic_updates
        self.normalize_advantage = normalize_advantage
        self.lr_multiplier = 1.0
        if _init_setup_model:
            self._setup_model()

    @classmethod
    def _invalid_policy(cls, policy: type) -> str:
        return (
            f"Invalid policy: {cls.__name__} needs a {cls.policy_base.__name__} (or the "
            f"aliases {', '.join(cls.policy_aliases)}), got {policy.__name__}"
        )

    def _kfac_optimizer(self) -> KFAC | None:
        """The policy's K-FAC optimizer, once the policy exists."""
        policy = self.__dict__.get("policy")
        return getattr(policy, "optimizer", None) if policy is not None else None

    @property
    def kfac_kwargs(self) -> dict[str, Any]:
        """The K-FAC options not given as ACKTR's own arguments (read-only)."""
        return {k: v for k, v in self.kfac_config.kwargs().items() if k not in OWN_OPTIONS}

    def _migrate_legacy_attributes(self) -> None:
        """A checkpoint of an older version stored the K-FAC options as attributes (and
        in ``policy_kwargs``), and ``ACKTR.load(..., custom_objects={"damping": ...})``
        sets them the same way: they go into :attr:`kfac_config`."""
        legacy = {
            k: self.__dict__.pop(k) for k in (*KFAC_ARGUMENTS, "kfac_kwargs") if k in self.__dict__
        }
        self.policy_kwargs = {
            k: v
            for k, v in self.policy_kwargs.items()
            if k not in ("kfac_kwargs", "kfac_config", "vf_fisher_coef")
        }
        if legacy:
            saved = legacy.pop("kfac_kwargs", None) or {}
            options = {k: v for k, v in saved.items() if k not in OWN_OPTIONS}
            if "momentum" in legacy:
                legacy["dampening"] = legacy["momentum"]
            self.kfac_config = self.kfac_config.replace(**options, **legacy)

    def _setup_model(self) -> None:
        self._migrate_legacy_attributes()
        given = self.policy_kwargs
        policy_config = self.kfac_config
        if self.n_critic_updates:  # the policy's K-FAC covers the actor only
            policy_config = policy_config.replace(
                skip_layers=(*policy_config.skip_layers, *critic_layer_patterns())
            )
        self.policy_kwargs = {
            **given,
            "kfac_config": policy_config,
            "vf_fisher_coef": self.vf_fisher_coef,
        }
        try:
            super()._setup_model()
        finally:
            self.policy_kwargs = given  # the config is kept once, in kfac_config
        if not isinstance(self.policy, self.policy_base):
            raise ValueError(self._invalid_policy(type(self.policy)))
        if is_distributed():  # every rank starts from rank 0's parameters
            broadcast_module(self.policy)
        # The cold-start optimizer: momentum SGD damped like the K-FAC phase's momentum.
        # baselines' is MomentumOptimizer(lr, μ), ten times stronger at steady state; that
        # measured worse on CartPole and no better on Breakout (docs/design.md).
        self.cold_optimizer = torch.optim.SGD(
            self.policy.parameters(),
            lr=self.lr_schedule(1),
            momentum=self.momentum,
            dampening=self.momentum,
        )
        #: The critic's K-FAC (``n_critic_updates > 0``; else ``None``): the policy's
        #: critic modules, every other one left out.
        self.critic_optimizer: KFAC | None = None
        if self.n_critic_updates:
            config = self.critic_kfac_config
            self.critic_optimizer = KFAC.from_config(
                self.policy,
                config.replace(
                    skip_layers=(*config.skip_layers, *actor_layer_patterns(self.policy))
                ),
            )

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        # "policy.optimizer" (K-FAC) carries the factors; the cold-start momentum too.
        names = ["policy", "policy.optimizer", "cold_optimizer"]
        return (names + ["critic_optimizer"] if self.critic_optimizer is not None else names), []

    def train(self) -> None:
        """One ACKTR update on the collected rollout."""
        self.policy.set_training_mode(True)
        optimizer = self.policy.optimizer
        self._update_learning_rate([optimizer, self.cold_optimizer])
        if self.lr_multiplier != 1.0:
            for group in optimizer.param_groups + self.cold_optimizer.param_groups:
                group["lr"] *= self.lr_multiplier
        cold = self._n_updates < self.cold_start_steps

        # With a separate critic, this pass's values feed no gradient and no statistics.
        critic = self.critic_optimizer
        for rollout_data in self._training_batches():
            with critic.no_statistics() if critic is not None else nullcontext():
                distribution, values = self._forward(rollout_data)
            values = values.flatten()

            # 1. Curvature statistics of the true Fisher (sampled actions and values).
            if optimizer.capture_due:
                self.policy.capture_fisher(
                    distribution,
                    values,
                    0.0 if self.n_critic_updates else self.vf_fisher_coef,
                    obs=rollout_data.observations,
                )

            # 2. The A2C loss (its value term left to the critic's own steps, if any).
            terms = self.a2c_loss_terms(distribution, values, rollout_data)
            policy_part = terms.policy + self.ent_coef * terms.entropy
            value_part = 0.0 if self.n_critic_updates else self.vf_coef * terms.value

            # 3. The step: momentum SGD while cold, K-FAC in the trust region after (its
            #    direction refined on the exact Fisher with cg_steps).
            divergence = None
            if optimizer.cg_steps and not cold:
                divergence = self.policy.fisher_divergence(
                    distribution, values, 0.0 if self.n_critic_updates else self.vf_fisher_coef
                )
            keep = divergence is not None  # its graph outlives the loss's backward pass
            optimizer.zero_grad()
            if cold:
                (policy_part + value_part).backward()
                average_gradients(self.policy.parameters())  # K-FAC averages its own
                torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.cold_optimizer.step()
            elif self.trust_region == "split":
                params = optimizer.param_groups[0]["params"]
                policy_grads = torch.autograd.grad(
                    policy_part, params, retain_graph=True, allow_unused=True
                )
                value_grads = torch.autograd.grad(
                    value_part, params, retain_graph=keep, allow_unused=True
                )
                kl_clip = optimizer.hyperparameter("kl_clip")
                value_kl_clip = self.value_kl_clip if self.value_kl_clip is not None else kl_clip
                optimizer.step_parts(
                    [(policy_grads, kl_clip), (value_grads, value_kl_clip)], divergence
                )
            else:
                (policy_part + value_part).backward(retain_graph=keep)
                optimizer.step(divergence=divergence)

            if self.target_kl is not None:
                self._adapt_learning_rate(rollout_data, terms.actions, terms.log_prob.detach())
            if self.critic_optimizer is not None:
                self.logger.record("train/critic_loss", self._fit_critic(rollout_data))

        self._n_updates += 1
        explained_var = explained_variance(
            self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten()
        )
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/explained_variance", explained_var)
        self.logger.record("train/entropy_loss", terms.entropy.item())
        self.logger.record("train/policy_loss", terms.policy.item())
        self.logger.record("train/value_loss", terms.value.item())
        self.logger.record("train/kfac_steps", optimizer.steps)
        for name, scale in zip(("", "_value"), optimizer.trust_region_scales, strict=False):
            self.logger.record(f"train/trust_region_scale{name}", scale)
        if self.target_kl is not None:
            self.logger.record("train/lr_multiplier", self.lr_multiplier)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", torch.exp(self.policy.log_std).mean().item())

    def _fit_critic(self, batch: RolloutBufferSamples) -> float:
        """``n_critic_updates`` K-FAC steps of the critic on ``mean((R − V(s))²)``; the
        mean loss of the steps."""
        optimizer = self.critic_optimizer
        assert optimizer is not None
        others = [p for name, p in self.policy.named_parameters() if not is_critic(name)]
        losses = []
        for _ in range(self.n_critic_updates):
            due = optimizer.capture_due
            with nullcontext() if due else optimizer.no_statistics():
                values = self._values(batch).flatten()
            if due:
                # The Fisher of a unit-variance Gaussian on one output is the Gauss-Newton
                # matrix JᵀJ: backpropagating 1 per example gives its statistics exactly,
                # without the noise of a sampled target.
                self.policy.capture_statistics(
                    values.mean(), rows=values.shape[0], optimizer=optimizer
                )
            value_loss = F.mse_loss(batch.returns, values)
            optimizer.zero_grad()
            value_loss.backward()
            for param in others:  # a shared trunk is the policy step's
                param.grad = None
            optimizer.step()
            losses.append(value_loss.item())
        return sum(losses) / len(losses)

    def _values(self, batch: RolloutBufferSamples) -> torch.Tensor:
        """The values ``V(s)`` (shape ``(N, 1)``) of a batch, the critic's pass alone."""
        return self.policy.predict_values(batch.observations)

    def _training_batches(self) -> Iterable[RolloutBufferSamples]:
        """The batches of one update: the whole rollout, once."""
        return self.rollout_buffer.get(batch_size=None)

    def _forward(self, batch: RolloutBufferSamples) -> tuple[Distribution, torch.Tensor]:
        """The policy's action distribution and values on a batch, in one pass."""
        return self.policy.distribution_and_values(batch.observations)

    def a2c_loss_terms(
        self, distribution: Distribution, values: torch.Tensor, rollout_data: RolloutBufferSamples
    ) -> A2CLossTerms:
        """The three terms of A2C's loss on a rollout, from one forward pass (``values``
        flattened); the loss is ``policy + ent_coef·entropy + vf_coef·value``."""
        actions = rollout_data.actions
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        log_prob = distribution.log_prob(actions)
        entropy = distribution.entropy()
        advantages = rollout_data.advantages
        if self.normalize_advantage:
            advantages = standardize(advantages)
        return A2CLossTerms(
            policy=-(advantages * log_prob).mean(),
            entropy=-torch.mean(-log_prob if entropy is None else entropy),
            value=F.mse_loss(rollout_data.returns, values),
            actions=actions,
            log_prob=log_prob,
        )

    @torch.no_grad()
    def _adapt_learning_rate(
        self, batch: RolloutBufferSamples, actions: torch.Tensor, old_log_prob: torch.Tensor
    ) -> None:
        """The continuous-control recipe: keep the measured KL of an update near ``target_kl``."""
        assert self.target_kl is not None
        distribution, _ = self._forward(batch)
        log_ratio = distribution.log_prob(actions) - old_log_prob
        # KL(old ‖ new) from the actions sampled by the old policy (low-variance estimator).
        kl_estimate = torch.mean(torch.expm1(log_ratio) - log_ratio).reshape(1)
        all_reduce_mean([kl_estimate])  # the ranks keep one learning rate
        kl = float(kl_estimate)
        if kl > 2.0 * self.target_kl:
            self.lr_multiplier = max(self.lr_multiplier / 1.5, 1e-8)
        elif kl < 0.5 * self.target_kl:
            self.lr_multiplier = min(self.lr_multiplier * 1.5, 1e8)
        self.logger.record("train/approx_kl", kl)

    def _init_callback(self, callback: MaybeCallback, progress_bar: bool = False) -> BaseCallback:
        if is_distributed():  # count every rank's steps, before the user's callbacks see them
            given = callback if isinstance(callback, list) else [callback] if callback else []
            callback = [GlobalTimesteps(), *given]
        return super()._init_callback(callback, progress_bar)

    def learn(
        self: SelfACKTR,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 100,
        tb_log_name: str = "ACKTR",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfACKTR:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
