"""The training loop: dispatch steps, record metrics one step behind, and keep the run alive.

Per step: take a batch, dispatch the jitted step (asynchronous), then read the *previous*
step's metrics while the device works on this one. Around that:
- validation at the steps `Evaluator.due` names;
- a checkpoint every `checkpoint.every` steps and at the end (asynchronous);
- a stop request (SIGTERM, SIGUSR1, `train.time_limit`): finish the step, save synchronously,
  raise Preempted (exit code 75);
- bad steps (non-finite loss or gradients, or a loss spike when `train.spike_sigma` > 0) change
  nothing; after `train.max_bad_steps` of them in a row the state rolls back to the last
  checkpoint while the data runs on, so the batches that caused them are skipped;
- stragglers: each process's host time per step travels with the stop vote, and a process
  that holds the others up is named (jaxlm/stragglers.py).
"""

import collections
import dataclasses
import logging
import math
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from jaxlm import sharding
from jaxlm.config import Config, TrainConfig
from jaxlm.errors import Diverged, Preempted
from jaxlm.stragglers import Slowdown, Stragglers

if TYPE_CHECKING:
    from jaxlm.checkpoint import Checkpoints, Restored
    from jaxlm.cost.accounting import StepAccounting
    from jaxlm.data.loader import Batches
    from jaxlm.evaluation import Evaluator
    from jaxlm.metrics import ProgressReport
    from jaxlm.preemption import StopRequest
    from jaxlm.step import Program, TrainState

log = logging.getLogger("jaxlm")

_SPIKE_MIN_HISTORY = 20  # steps of history before a spike can be called


class BadSteps:
    """Counts bad steps in a row; gives the loss above which a step counts as a spike."""

    def __init__(self, t: TrainConfig):
        self.sigma, self.max_in_a_row = t.spike_sigma, t.max_bad_steps
        self.recent = collections.deque(maxlen=max(t.spike_window, 2))
        self.in_a_row = 0

    def loss_limit(self) -> float:
        if not self.sigma or len(self.recent) < min(_SPIKE_MIN_HISTORY, self.recent.maxlen):
            return math.inf
        return statistics.fmean(self.recent) + self.sigma * statistics.pstdev(self.recent)

    def observe(self, row: dict) -> None:
        if row["skipped"]:
            self.in_a_row += 1
        else:
            self.in_a_row = 0
            self.recent.append(row["loss"])

    @property
    def rollback_due(self) -> bool:
        return self.in_a_row >= self.max_in_a_row

    def reset(self) -> None:
        self.in_a_row = 0


@dataclasses.dataclass
class Loop:
    cfg: Config
    program: "Program"
    batches: "Batches"
    evaluate: "Evaluator"
    checkpoints: "Checkpoints | None"  # None without a run directory
    write: Callable[..., None]  # write(row, prefix="train")
    progress: "ProgressReport"
    stop: "StopRequest"
    metadata: dict  # saved with every checkpoint
    restore: "Callable[[], Restored | None]"  # the newest intact checkpoint
    accounting: "StepAccounting | None" = None  # MFU and energy per row
    # tells the step watchdog (jaxlm/watchdog.py) which phase the loop is in
    enter: Callable[..., None] = lambda phase, step, kind=None, waiting=True: None

    def run(self, state: "TrainState") -> "TrainState":
        t = self.cfg.train
        mesh = self.program.batch_sharding.mesh
        n_devices = mesh.devices.size
        tokens_per_step = t.global_batch_size * t.seq_len
        replicated = sharding.replicated(mesh)
        bad = BadSteps(t)
        poison = _poisoner(self.cfg, self.program.batch_sharding)
        vote = _StopVote(self.stop, mesh)
        stragglers = Stragglers(t.straggler_every, t.straggler_margin, hostnames())
        slow = _slowdown(self.cfg)
        step = int(jax.device_get(state.step))
        saved_step = resumed_from = step
        account = self.accounting
        joules = account.joules if account else lambda: None

        def mark():  # when a step's time (and energy) starts or ends
            return time.perf_counter(), joules()

        pending, last_done, first, stop = None, mark(), True, False

        def record(step, step_metrics, stop_vote, started, taken):
            # Blocks until `step` is done, while the device already works on the next one.
            values, (stop_agreed, host_times) = jax.device_get((step_metrics, stop_vote))
            now = mark()
            row = {"step": step, **{k: float(v) for k, v in values.items()}}
            row |= {f"tokens/{name}": tokens for name, tokens in taken.items()}  # of a blend
            row["skipped"] = int(row["skipped"])
            row["skipped_steps"] = int(row["skipped_steps"])
            row["step_time_s"] = now[0] - started[0]
            row["host_time_s"] = float(host_times[jax.process_index()])
            row["tokens_per_s"] = tokens_per_step / row["step_time_s"]
            row["tokens_per_s_per_device"] = row["tokens_per_s"] / n_devices
            if account:
                account.annotate(row, None if now[1] is None else now[1] - started[1], now[1])
            if self.cfg.model.compute_dtype != "float16":
                del row["loss_scale"]
            if self.program.stages.stages > 1:
                row["pipeline_bubble"] = self.program.stages.bubble
            self.write(row)
            self.progress.update(row)
            bad.observe(row)
            slow.observe(row["step_time_s"])
            for event in stragglers.observe(step, host_times, row["step_time_s"]):
                self.write(event, prefix="events")
            return now, bool(stop_agreed)

        # Inside the loop every host<->device copy is explicit (device_put / device_get): a stray
        # implicit one would stall the dispatched steps, so it fails loudly instead.
        with jax.transfer_guard("disallow"):
            while step < t.steps:
                self.enter(f"step {step + 1}: preparing", step + 1, "host", waiting=False)
                preparing = time.perf_counter()
                _maybe_hang(self.cfg, step + 1, resumed=resumed_from > 0)
                time.sleep(slow.delay_s())
                # host time: this process's own work before it can dispatch, awaiting no device
                # (putting the batch on the devices may wait for them, on CPU for the last step)
                host_time = time.perf_counter() - preparing
                batch = poison(next(self.batches), self.batches.position)
                host_time += self.batches.read_s
                self.enter("compiling" if first else f"step {step + 1}", step + 1, "step")
                limit = jax.device_put(np.float32(bad.loss_limit()), replicated)
                dispatched = time.perf_counter()
                state, step_metrics = self.program.train_step(state, batch, limit)
                step += 1
                if first:  # the first call traced and compiled before it returned
                    log.info("compiled the train step in %.1f s", time.perf_counter() - dispatched)
                    last_done, first = mark(), False
                elif pending:
                    last_done, stop = record(*pending)
                pending = (
                    step,
                    step_metrics,
                    vote.cast(host_time),
                    last_done,
                    self.batches.taken(),
                )

                every = self.cfg.checkpoint.every
                save = step == t.steps or (every and step % every == 0)
                if not (stop or save or bad.rollback_due or self.evaluate.due(step)):
                    continue
                _, stop_now = record(*pending)  # everything below needs the step finished
                stop, pending = stop or stop_now, None
                if bad.rollback_due and not stop:
                    self.enter("rolling back", step, "saving")
                    state, step = self._roll_back(state, step, bad)
                    last_done = mark()
                    continue
                if self.evaluate.due(step):
                    self.enter("validating", step)
                    self.write(self.evaluate(state, step), prefix="val")
                if save and bad.in_a_row and not (stop or step == t.steps):
                    # a rollback must land before the streak of bad steps
                    log.info("no checkpoint at step %d: inside a run of bad steps", step)
                    save = False
                if (save or stop) and self.checkpoints:
                    self.enter(f"saving checkpoint {step}", step, "saving")
                    self.checkpoints.save(
                        step, state, self.batches.get_state(), self.cfg, self.metadata, wait=stop
                    )
                    saved_step = step
                if stop:
                    where = (
                        f"the checkpoint of step {saved_step} continues the run"
                        if self.checkpoints
                        else "nothing saved (no run directory)"
                    )
                    raise Preempted(
                        f"stopped by {self.stop.reason or 'another process'} after "
                        f"step {step}; {where}"
                    )
                last_done = mark()  # the next step's time and energy exclude the above
        if pending:
            record(*pending)
        self.enter("finishing", step, "saving")  # the last asynchronous save completes
        return state

    def _roll_back(self, state, step: int, bad: BadSteps):
        restored = self.restore() if self.checkpoints else None
        if restored is None:
            raise Diverged(
                f"{bad.in_a_row} bad steps in a row (non-finite or spiking loss) up to "
                f"step {step}, and no checkpoint to roll back to"
            )
        log.warning(
            "%d bad steps in a row up to step %d: rolled back to the checkpoint of step "
            "%d; the data goes on, so the batches that caused them are skipped",
            bad.in_a_row,
            step,
            restored.step,
        )
        self.write({"step": step, "rolled_back_to": restored.step}, prefix="events")
        bad.reset()
        return restored.state, restored.step


class _StopVote:
    """Makes one stop decision that every process shares. Each process casts its own request
    (a signal it got, its clock against the time limit) as one flag per local device; the
    devices reduce them with `any`, and the loop reads the result with the step's metrics, so
    all processes stop after the same step without an extra host synchronisation.

    The same trip carries each process's host time (jaxlm/stragglers.py): one number per
    device, gathered, so that every process reads every process's time."""

    def __init__(self, request, mesh):
        self.request = request
        self._by_device = NamedSharding(mesh, PartitionSpec(mesh.axis_names))
        self._size = mesh.devices.size
        # one of each process's devices in the flattened mesh: where its host time lands
        first_of_process = np.unique(
            [d.process_index for d in mesh.devices.flat], return_index=True
        )[1]
        self._gather = jax.jit(
            lambda flags, times: (jnp.any(flags), times[first_of_process]),
            out_shardings=sharding.replicated(mesh),
        )

    def cast(self, host_time: float) -> tuple[jax.Array, jax.Array]:
        local = len(self._by_device.addressable_devices)
        flags = np.full(local, self.request.requested)
        times = np.full(local, host_time, np.float32)
        with jax.transfer_guard_host_to_device("allow"):  # intended: the vote goes to the devices
            flags, times = (
                jax.make_array_from_process_local_data(self._by_device, x, (self._size,))
                for x in (flags, times)
            )
        return self._gather(flags, times)  # the vote, and host times by process index


def hostnames() -> list[str]:
    """Every process's host name, by process index (one gather, before the loop)."""
    if jax.process_count() == 1:
        return [socket.gethostname()]
    name = np.zeros(256, np.uint8)
    encoded = socket.gethostname().encode()[:256]
    name[: len(encoded)] = np.frombuffer(encoded, np.uint8)
    names = np.asarray(multihost_utils.process_allgather(name))
    return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in names]


def _slowdown(cfg: Config) -> Slowdown:
    slow = cfg.debug.slow_process is not None and jax.process_index() == cfg.debug.slow_process
    if slow:
        log.warning(
            "debug.slow_process: process %d runs its steps %g times slower",
            jax.process_index(),
            cfg.debug.slow_factor,
        )
    return Slowdown(cfg.debug.slow_factor if slow else None)


def _maybe_hang(cfg: Config, step: int, resumed: bool) -> None:
    """The debug.hang_at_step hook: this process stops making progress, as a stuck one would,
    in a run that started from scratch (so that a requeued run goes on)."""
    hang = cfg.debug.hang_at_step == step and not resumed
    if hang and jax.process_index() == cfg.debug.hang_process:
        log.warning(
            "debug.hang_at_step: process %d hangs before step %d", jax.process_index(), step
        )
        threading.Event().wait()  # forever: only the watchdog ends this


def _poisoner(cfg: Config, batch_sharding: NamedSharding):
    """The debug.nan_at_step hook: NaN loss weights for chosen batches, as bad data would give."""
    first = cfg.debug.nan_at_step
    if first is None:
        return lambda batch, position: batch
    spoil = jax.jit(lambda w: w * jnp.nan, out_shardings=batch_sharding)

    def poison(batch, position: int):
        # `position` counts the batches consumed so far, this one included: step k of an
        # uninterrupted run consumes batch k.
        if first <= position < first + cfg.debug.nan_steps:
            return {**batch, "weights": spoil(batch["weights"])}
        return batch

    return poison
