"""Task samplers (a registry): which task each batch (or, in mixed batches, each example) comes
from.

Every sampler is a pure function of (seed, step): ``tasks(step, count)`` needs no hidden RNG state,
so the iterator's state is just the step counter and restoring it replays the same choices.
"""
from __future__ import annotations

import numpy as np

from mtl_jax.errors import UserError
from mtl_jax.registry import Registry


class Sampler:
    """Draws task indices i.i.d. from ``rates`` (rates[t] = probability of task t)."""

    def __init__(self, sizes: list[int], data_config, seed: int, names: tuple[str, ...] = ()):
        self.sizes = np.asarray(sizes, np.float64)
        self.seed = seed
        self.names = tuple(names)  # the tasks of ``sizes``, in order (for rates given by name)
        self.rates = self.compute_rates(self.sizes, data_config)

    def compute_rates(self, sizes: np.ndarray, data_config) -> np.ndarray:
        raise NotImplementedError

    def tasks(self, step: int, count: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, 0x5A3])
        return rng.choice(len(self.rates), size=count, p=self.rates)


SAMPLERS: Registry[type[Sampler]] = Registry("sampler")


@SAMPLERS.register("proportional")
class Proportional(Sampler):
    """rate ∝ min(n_t, K) (T5's examples-proportional mixing; K = data.size_cap, 0 = no cap)."""

    def compute_rates(self, sizes, data_config):
        if data_config.size_cap < 0:
            raise UserError(f"data.size_cap={data_config.size_cap} must be >= 0 (0 = no cap)")
        capped = np.minimum(sizes, data_config.size_cap) if data_config.size_cap else sizes
        return capped / capped.sum()


@SAMPLERS.register("temperature")
class Temperature(Sampler):
    """rate ∝ n_t^(1/T): T=1 is proportional, T→∞ uniform."""

    def compute_rates(self, sizes, data_config):
        if data_config.temperature <= 0:
            raise UserError(f"data.temperature={data_config.temperature} must be > 0")
        scaled = sizes ** (1.0 / data_config.temperature)
        return scaled / scaled.sum()


@SAMPLERS.register("uniform")
class Uniform(Sampler):
    def compute_rates(self, sizes, data_config):
        return np.full(len(sizes), 1.0 / len(sizes))


@SAMPLERS.register("rates")
class GivenRates(Sampler):
    """rate ∝ data.sampling_rates[task] (seqio's Mixture with explicit per-task rates): a mix
    chosen for a budget rather than for the data's sizes."""

    def compute_rates(self, sizes, data_config):
        given = dict(data_config.sampling_rates)
        unknown = sorted(set(given) - set(self.names))
        missing = [n for n in self.names if n not in given]
        if unknown or missing:
            raise UserError(f"data.sampler=rates: data.sampling_rates must give a rate for each "
                            f"trained task {list(self.names)}"
                            + (f"; unknown {unknown}" if unknown else "")
                            + (f"; missing {missing}" if missing else ""))
        rates = np.asarray([float(given[n]) for n in self.names], np.float64)
        if np.any(rates < 0) or not rates.sum() > 0:
            raise UserError(f"data.sampling_rates={given} must be >= 0 with a positive sum")
        return rates / rates.sum()


@SAMPLERS.register("round_robin")
class RoundRobin(Uniform):
    """Tasks in turn: batch s is task s mod T (mixed batches: example i of step s is
    (s*B+i) mod T)."""

    def tasks(self, step, count):
        return (step * count + np.arange(count)) % len(self.rates)


def build_sampler(name: str, sizes: list[int], data_config, seed: int,
                  names: tuple[str, ...] = ()) -> Sampler:
    return SAMPLERS.get(name)(sizes, data_config, seed, names)
