"""Recurrent ACKTR: ACKTR with an LSTM actor-critic, in the shape of sb3-contrib's
``RecurrentPPO`` (its policies, rollout collection and buffer), its K-FAC blocks those of
:mod:`ngrl.recurrent`."""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib.common.recurrent.buffers import RecurrentDictRolloutBuffer, RecurrentRolloutBuffer
from sb3_contrib.common.recurrent.policies import RecurrentActorCriticPolicy
from sb3_contrib.common.recurrent.type_aliases import RNNStates
from sb3_contrib.ppo_recurrent import RecurrentPPO
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.torch_layers import CombinedExtractor, NatureCNN
from stable_baselines3.common.type_aliases import Schedule
from torch import Tensor, nn

from ngrl import KFAC
from ngrl.agents.acktr import ACKTR
from ngrl.agents.policies import KFACOptimized

__all__ = [
    "CnnLstmPolicy",
    "KFACRecurrentActorCriticPolicy",
    "MlpLstmPolicy",
    "MultiInputLstmPolicy",
    "RecurrentACKTR",
    "SequenceBatch",
]


class SequenceBatch(NamedTuple):
    """A whole rollout as ``n_envs`` sequences of ``n_steps`` transitions, flattened
    sequence by sequence (the rows of one environment are consecutive), with the LSTM
    states at each sequence's first step and where episodes start inside them."""

    observations: Tensor | dict[str, Tensor]
    actions: Tensor
    advantages: Tensor
    returns: Tensor
    lstm_states: RNNStates
    episode_starts: Tensor


class KFACRecurrentActorCriticPolicy(KFACOptimized, RecurrentActorCriticPolicy):
    """sb3-contrib's LSTM actor-critic trained by :class:`ngrl.optim.KFAC`, with ACKTR's
    Fisher (:class:`ngrl.agents.policies.KFACOptimized`).

    In training passes the LSTMs run one time step at a time, the state reset where an
    episode starts, so that every transition of the rollout is one example of the Fisher,
    as in feedforward ACKTR: the recurrent maps get K-FAC over independent time steps
    (``E[δ_t δ_tᵀ] ⊗ E[a_t a_tᵀ]``, with ``δ_t`` the gradient of the rollout's
    log-likelihood backpropagated through time to step ``t``).
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(observation_space, action_space, lr_schedule, *args, **kwargs)
        self.install_kfac(lr_schedule)  # the LSTMs come after SB3's _build

    def distribution_and_values(
        self, obs: Tensor | dict[str, Tensor], lstm_states: RNNStates, episode_starts: Tensor
    ) -> tuple[Distribution, Tensor]:
        """The action distribution and the values ``V(s)`` of a :class:`SequenceBatch`'s
        rows, in one pass."""
        pi_features, vf_features = self._split_features(obs)
        latent_pi = _step_by_step(pi_features, lstm_states.pi, episode_starts, self.lstm_actor)
        values = self._critic_values(vf_features, lstm_states, episode_starts, latent_pi)
        latent_pi = self.mlp_extractor.forward_actor(latent_pi)
        return self._get_action_dist_from_latent(latent_pi), values

    def values(
        self, obs: Tensor | dict[str, Tensor], lstm_states: RNNStates, episode_starts: Tensor
    ) -> Tensor:
        """The values ``V(s)`` of a :class:`SequenceBatch`'s rows (the actor's LSTM runs only
        when the critic shares it)."""
        pi_features, vf_features = self._split_features(obs)
        latent_pi = None
        if self.shared_lstm:
            latent_pi = _step_by_step(pi_features, lstm_states.pi, episode_starts, self.lstm_actor)
        return self._critic_values(vf_features, lstm_states, episode_starts, latent_pi)

    def _split_features(self, obs: Tensor | dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        features = self.extract_features(obs)
        if self.share_features_extractor:
            return features, features
        return features

    def _critic_values(
        self,
        vf_features: Tensor,
        lstm_states: RNNStates,
        episode_starts: Tensor,
        latent_pi: Tensor | None,
    ) -> Tensor:
        if self.lstm_critic is not None:
            latent_vf = _step_by_step(vf_features, lstm_states.vf, episode_starts, self.lstm_critic)
        elif self.shared_lstm:
            assert latent_pi is not None
            latent_vf = latent_pi.detach()
        else:
            latent_vf = self.critic(vf_features)
        return self.value_net(self.mlp_extractor.forward_critic(latent_vf))

    def capture_statistics(self, loss: Tensor, rows: int, optimizer: KFAC | None = None) -> None:
        # Each time step is a separate LSTM call: a backward pass through the whole graph
        # reaches every step's hooks, and the loss averages over all rows, not over the
        # sequences an LSTM call sees.
        optimizer = optimizer or self.optimizer
        with optimizer.capture(examples=rows):
            loss.backward(retain_graph=True)
        optimizer.zero_grad()

    def capture_fisher(
        self,
        distribution: Distribution,
        values: Tensor,
        vf_fisher_coef: float | None = None,
        obs: Any = None,
    ) -> None:
        """As :meth:`KFACOptimized.capture_fisher`, always from every row of the batch (a
        subset of rows is not a set of sequences)."""
        super().capture_fisher(distribution, values, vf_fisher_coef)


def _step_by_step(
    features: Tensor, states: tuple[Tensor, Tensor], episode_starts: Tensor, lstm: nn.LSTM
) -> Tensor:
    """The LSTM over ``n_seq`` sequences of rows (``features`` flattened sequence by
    sequence, ``n_seq`` from the states), one step per call, the state zeroed where an
    episode starts; the outputs in the same row order."""
    n_seq = states[0].shape[1]
    steps = features.reshape(n_seq, -1, lstm.input_size).transpose(0, 1)
    keeps = (1.0 - episode_starts.reshape(n_seq, -1).transpose(0, 1))[:, None, :, None]
    outputs = []
    for step, keep in zip(steps, keeps, strict=True):
        output, states = lstm(step[None], (keep * states[0], keep * states[1]))
        outputs.append(output)
    return torch.cat(outputs).transpose(0, 1).flatten(0, 1)


class KFACRecurrentActorCriticCnnPolicy(KFACRecurrentActorCriticPolicy):
    """:class:`KFACRecurrentActorCriticPolicy` with SB3's Nature CNN features (images)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", NatureCNN)
        super().__init__(*args, **kwargs)


class KFACRecurrentMultiInputActorCriticPolicy(KFACRecurrentActorCriticPolicy):
    """:class:`KFACRecurrentActorCriticPolicy` for dict observations."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", CombinedExtractor)
        super().__init__(*args, **kwargs)


MlpLstmPolicy = KFACRecurrentActorCriticPolicy
CnnLstmPolicy = KFACRecurrentActorCriticCnnPolicy
MultiInputLstmPolicy = KFACRecurrentMultiInputActorCriticPolicy


class RecurrentACKTR(ACKTR):
    r""":class:`ngrl.agents.ACKTR` (Wu et al. 2017) with an LSTM actor-critic.

    The update is ACKTR's, on the rollout's ``n_envs`` sequences of ``n_steps``
    transitions: K-FAC statistics of the sampled Fisher loss, the A2C loss, then the
    natural-gradient step in the KL trust region,

    .. code-block:: text

        X = (F̂ + λI)⁻¹∇,  ν = min(1, sqrt(kl_clip / (lr² Σ⟨X, ∇⟩))),  θ ← θ − lr·ν·X (momentum)

    with the LSTMs' maps preconditioned by K-FAC over independent time steps
    (:class:`KFACRecurrentActorCriticPolicy`). Rollouts, hidden states (carried across
    rollouts, reset at episode starts) and the policies' architecture are sb3-contrib's
    ``RecurrentPPO``'s (``lstm_hidden_size``, ``n_lstm_layers``, ``shared_lstm``,
    ``enable_critic_lstm`` in ``policy_kwargs``). Arguments: :class:`ngrl.agents.ACKTR`'s.
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpLstmPolicy": MlpLstmPolicy,
        "CnnLstmPolicy": CnnLstmPolicy,
        "MultiInputLstmPolicy": MultiInputLstmPolicy,
    }
    policy: KFACRecurrentActorCriticPolicy  # type: ignore[assignment]
    policy_base = KFACRecurrentActorCriticPolicy

    # The rollouts are RecurrentPPO's: hidden states carried across steps and rollouts,
    # reset at episode starts, stored in a recurrent buffer.
    collect_rollouts = RecurrentPPO.collect_rollouts

    def _setup_model(self) -> None:
        super()._setup_model()
        lstm = self.policy.lstm_actor
        state_shape = (lstm.num_layers, self.n_envs, lstm.hidden_size)

        def zeros() -> tuple[Tensor, Tensor]:
            return (
                torch.zeros(state_shape, device=self.device),
                torch.zeros(state_shape, device=self.device),
            )

        self._last_lstm_states = RNNStates(zeros(), zeros())
        buffer_class = (
            RecurrentDictRolloutBuffer
            if isinstance(self.observation_space, spaces.Dict)
            else RecurrentRolloutBuffer
        )
        self.rollout_buffer = buffer_class(
            self.n_steps,
            self.observation_space,
            self.action_space,
            (self.n_steps, *state_shape),
            self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
        )

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_last_lstm_states"]

    def _training_batches(self) -> list[SequenceBatch]:  # type: ignore[override]
        buffer = self.rollout_buffer
        assert isinstance(buffer, RecurrentRolloutBuffer | RecurrentDictRolloutBuffer)

        def rows(array: np.ndarray) -> Tensor:  # (n_steps, n_envs, ...) → sequence rows
            flat = array.swapaxes(0, 1).reshape(-1, *array.shape[2:])
            return torch.as_tensor(flat, device=self.device)

        observations = (
            {key: rows(value) for key, value in buffer.observations.items()}
            if isinstance(buffer.observations, dict)
            else rows(buffer.observations)
        )

        def first(array: np.ndarray) -> Tensor:
            return torch.as_tensor(array[0], device=self.device)

        states = RNNStates(
            (first(buffer.hidden_states_pi), first(buffer.cell_states_pi)),
            (first(buffer.hidden_states_vf), first(buffer.cell_states_vf)),
        )
        return [
            SequenceBatch(
                observations=observations,
                actions=rows(buffer.actions),
                advantages=rows(buffer.advantages).flatten(),
                returns=rows(buffer.returns).flatten(),
                lstm_states=states,
                episode_starts=rows(buffer.episode_starts).flatten(),
            )
        ]

    def _forward(self, batch: SequenceBatch) -> tuple[Distribution, Tensor]:  # type: ignore[override]
        return self.policy.distribution_and_values(
            batch.observations, batch.lstm_states, batch.episode_starts
        )

    def _values(self, batch: SequenceBatch) -> Tensor:  # type: ignore[override]
        return self.policy.values(batch.observations, batch.lstm_states, batch.episode_starts)
