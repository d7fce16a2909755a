"""Triton's sequence batcher: requests of one sequence (correlation id) go to one batch slot of
one instance, in order, one at a time; requests of different sequences batch together.

Each instance has its own slots (`InstanceSlots`, the Scheduler its thread pulls from). A new
sequence (a START request) takes a free slot, or waits in the backlog until an END frees one.
Two strategies, as in Triton (core `src/sequence_batch_scheduler/`):

- direct: slot i is always row i of the batch. A batch holds rows 0..highest slot with a
  request; rows of slots with nothing to run get a *null* request (a copy of another
  request's inputs with READY false), so a model that keeps state per row never mixes rows.
- oldest: the fronts of the sequences queued on an instance are batched oldest first, up to
  max_batch_size (or a preferred size), waiting up to max_queue_delay for more.

The scheduler fills the control inputs (START, END, READY, CORRID) and implicit state
(`state`: the output of one step is the input of the next; reset at START) into every row.
An instance forms its next batch only after its previous one ran, so a sequence's next
step always sees the state its previous step wrote. A sequence idle for longer than
`max_sequence_idle_microseconds` is released; a later request for it fails as in Triton.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from time import monotonic_ns, perf_counter_ns
from typing import Any

import numpy as np

from backends.datatypes import NUMPY_OF
from server.core.scheduler import Job, Scheduler
from server.core.sequence_config import CORRID, END, READY, START, SequenceSettings
from server.core.warmup import WarmupSample
from server.errors import Cancelled, InvalidInput, NereidError, ServerUnavailable
from server.types import InferenceRequest

log = logging.getLogger("nereid.sequence")

Entry = tuple[Job, bool, bool, int]  # (job, start, end, enqueued at, monotonic ns)
Outcome = tuple[Any, Any]
# Answers a request the scheduler drops without running it: (job, error, Triton's failure reason).
Drop = Callable[[Job, NereidError, str], None]
NO_DEADLINE = 1 << 63
# Triton's messages for a dropped sequence (core sequence_batch_scheduler.cc).
TIMEOUT_MESSAGE = "timeout of the corresponding sequence has been expired"


class Sequence:
    """One correlation id's requests, state and slot."""

    __slots__ = ("corrid", "queue", "state", "seen_ns", "slot", "inflight", "deadline_ns")

    def __init__(self, corrid: int | str, now: int) -> None:
        self.corrid = corrid
        self.queue: deque[Entry] = deque()
        self.state: dict[str, np.ndarray] | None = None
        self.seen_ns = now
        self.slot: Slot | None = None
        self.inflight = False
        self.deadline_ns = NO_DEADLINE  # while in the backlog: the earliest `timeout` of its requests

    def cancelled(self) -> bool:
        return any(entry[0].cancelled() for entry in self.queue)


class Slot:
    __slots__ = ("owner", "index", "sequence")

    def __init__(self, owner: InstanceSlots, index: int) -> None:
        self.owner = owner
        self.index = index
        self.sequence: Sequence | None = None


class InstanceSlots(Scheduler):
    """One instance's slots; its worker thread pulls batches here."""

    def __init__(self, batcher: SequenceBatcher, index: int, count: int, lock: threading.Lock) -> None:
        self.batcher = batcher
        self.index = index
        self.slots = [Slot(self, i) for i in range(count)]
        self.cond = threading.Condition(lock)
        self.running: list[tuple[Job, Sequence | None]] = []

    def enqueue(self, job: Job) -> None:
        self.batcher.enqueue(job)

    def next_batch(self) -> list[Job] | None:
        return self.batcher.next_batch(self)

    def executed(self, jobs: list[Job], outcomes: list[Outcome]) -> None:
        self.batcher.executed(self, outcomes)

    def pending(self) -> int:
        return self.batcher.pending()

    def stop(self, instances: int) -> None:
        self.batcher.stop(instances)


class SequenceBatcher(Scheduler):
    """The model-wide part: correlation ids, free slots, backlog, idle reaper."""

    def __init__(self, settings: SequenceSettings, model_name: str, input_names: tuple[str, ...],
                 clock: Callable[[], int] = monotonic_ns, drop: Drop | None = None) -> None:
        self.settings = settings
        self.model_name = model_name
        self._input_names = input_names
        self._clock = clock
        self._drop = drop or _drop
        self._lock = threading.Lock()
        self._reaper_cond = threading.Condition(self._lock)
        self._views: list[InstanceSlots] = []
        self._free: list[tuple[int, int, Slot]] = []  # heap: low slot index first, spread over instances
        self._sequences: dict[int | str, Sequence] = {}  # live (not yet ended) sequences by correlation id
        self._backlog: deque[Sequence] = deque()
        self._stopped = False
        self._reaper: threading.Thread | None = None
        self._row = (1, 1) if settings.max_batch_size > 0 else (1,)
        self._state_outputs = tuple(s.output_name for s in settings.states)
        self._corrid = next((c for c in settings.controls if c.kind == CORRID), None)
        self._next_id = 1  # iterative_sequence: ids for requests that come without one (as Triton numbers them)

    def view(self) -> InstanceSlots:
        """A new instance's slots (called once per instance at load)."""
        with self._lock:
            view = InstanceSlots(self, len(self._views), self.settings.slots_per_instance, self._lock)
            self._views.append(view)
            for slot in view.slots:
                heapq.heappush(self._free, (slot.index, view.index, slot))
        return view

    # -- event loop side --

    def enqueue(self, job: Job) -> None:
        """Route one request to its sequence; raises InvalidInput as Triton does."""
        params = job.request.parameters
        if self.settings.max_batch_size > 0 and job.request.batch_size > 1:  # Triton's check, first
            raise InvalidInput(f"inference request to model '{self.model_name}' must specify batch-size 1 due to "
                               "requirements of sequence batcher")
        corrid: int | str = params.get("sequence_id", 0)
        if isinstance(corrid, int) and corrid < 0:
            corrid += 1 << 64  # Triton keeps integer ids as uint64
        start, end = bool(params.get("sequence_start", False)), bool(params.get("sequence_end", False))
        if (corrid == 0 or corrid == "") and self.settings.iterative:
            corrid, start = self._fresh_id(), True  # Triton's IterativeSequencer: a new sequence of its own
        if corrid == 0 or corrid == "":
            raise InvalidInput(f"inference request to model '{self.model_name}' must specify a non-zero or "
                               "non-empty correlation ID")
        if self._corrid is not None and isinstance(corrid, str) and self._corrid.datatype != "BYTES":
            if not corrid.isdigit():
                raise InvalidInput(f"sequence id '{corrid}' is a string but the CORRID control input "
                                   f"'{self._corrid.name}' of model '{self.model_name}' is {self._corrid.datatype}")
        now = self._clock()
        with self._lock:
            if self._stopped:
                raise ServerUnavailable("Server is stopping, scheduler for model has stopped accepting new "
                                        "inference requests")
            seq = self._sequences.get(corrid)
            if seq is None:
                if not start:
                    raise InvalidInput(f"inference request for sequence {corrid} to model '{self.model_name}' must "
                                       "specify the START flag on the first request of the sequence")
                seq = self._sequences[corrid] = Sequence(corrid, now)
                if self._free:
                    self._assign(seq, heapq.heappop(self._free)[2])
                else:
                    self._backlog.append(seq)
            elif start:
                log.warning("sequence %s for model '%s' has a conflict. The previous sequence did not end before "
                            "this sequence start. Previous sequence will be terminated early.", corrid,
                            self.model_name)
            seq.seen_ns = now
            seq.queue.append((job, start, end, now))
            if seq.slot is None and "timeout" in params:  # waiting for a slot: Triton's backlog timeout
                timeout_us = params["timeout"]
                if isinstance(timeout_us, int) and timeout_us > 0 and now + timeout_us * 1000 < seq.deadline_ns:
                    seq.deadline_ns = now + timeout_us * 1000
                    self._reaper_cond.notify_all()
            if end:  # a later request with this id starts a new sequence
                del self._sequences[corrid]
            if seq.slot is not None:
                seq.slot.owner.cond.notify()
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap_loop, name=f"sequence-reaper-{self.model_name}",
                                                daemon=True)
                self._reaper.start()

    def warmup_sample(self, sample: WarmupSample) -> WarmupSample:
        """A `model_warmup` sample with the control and state inputs it does not name filled in, as
        one whole sequence in each row (START and END true, READY true, CORRID 0, initial state).
        Triton runs warmup on the instance, past the scheduler, with only what the sample names."""
        batch = sample.batch_size if self.settings.max_batch_size > 0 else 1
        filled = dict(sample.inputs)
        for name, value in self._controls(True, True, True, None).items():
            if name not in filled:
                filled[name] = np.repeat(value, batch, axis=0) if self.settings.max_batch_size > 0 else value
        for st in self.settings.states:
            if st.input_name not in filled:
                filled[st.input_name] = np.stack([st.initial] * batch) if self.settings.max_batch_size > 0 \
                    else st.initial
        return replace(sample, inputs=filled)

    # -- instance threads --

    def next_batch(self, view: InstanceSlots | None = None) -> list[Job] | None:
        """Block until `view`'s instance has a batch to run; None once stopped."""
        assert view is not None, "each instance pulls from its own InstanceSlots"
        with self._lock:
            while True:
                jobs, wait_ns = self._form(view, self._clock(), self._stopped)
                if jobs:
                    return jobs
                if self._stopped:  # what its slots held has run: the instance may exit
                    return None
                view.cond.wait(None if wait_ns is None else wait_ns / 1e9)

    def _form(self, view: InstanceSlots, now: int, draining: bool = False) -> tuple[list[Job] | None, int | None]:
        for slot in view.slots:  # a sequence whose next request was cancelled ends here, as in Triton
            seq = slot.sequence
            if seq is not None and seq.queue and seq.queue[0][0].cancelled():
                self._cancel(seq)
        ready = [slot for slot in view.slots if slot.sequence is not None and slot.sequence.queue]
        if not ready:
            return None, None
        s = self.settings
        oldest = min(slot.sequence.queue[0][3] for slot in ready)  # type: ignore[union-attr]
        waited = now - oldest
        view.running = []
        if s.strategy == "oldest":
            ready.sort(key=lambda slot: slot.sequence.queue[0][3])  # type: ignore[union-attr]
            key = _shape_key(ready[0].sequence.queue[0][0], self._input_names)  # type: ignore[union-attr]
            ready = [slot for slot in ready if _shape_key(slot.sequence.queue[0][0], self._input_names) == key]  # type: ignore[union-attr]
            limit = max(1, s.max_batch_size)
            count = min(len(ready), limit)
            fits = [p for p in s.preferred_batch_sizes if p <= count]
            if fits and count < limit:
                count = fits[-1]
            elif count < limit and s.queue_delay_ns and waited < s.queue_delay_ns and not fits and not draining:
                return None, s.queue_delay_ns - waited
            return [self._take(view, slot) for slot in ready[:count]], None
        if s.queue_delay_ns and s.minimum_slot_utilization > 0 and waited < s.queue_delay_ns and not draining and \
                len(ready) / max(1, s.max_batch_size) < s.minimum_slot_utilization:
            return None, s.queue_delay_ns - waited
        representative = ready[0].sequence.queue[0][0]  # type: ignore[union-attr]
        key = _shape_key(representative, self._input_names)
        null_inputs = {n: representative.request.inputs[n] for n in self._input_names
                       if n in representative.request.inputs}
        jobs: list[Job] = []
        for slot in view.slots[:max(slot.index for slot in ready) + 1]:
            seq = slot.sequence
            if seq is not None and seq.queue and _shape_key(seq.queue[0][0], self._input_names) == key:
                jobs.append(self._take(view, slot))
            else:
                jobs.append(self._null(representative, dict(null_inputs)))
                view.running.append((jobs[-1], None))
        if s.states:  # a null row's state: zeros shaped like a real row's (the state may have grown)
            real = next(job for job, seq in view.running if seq is not None).request.inputs
            for job, seq in view.running:
                if seq is None:
                    for st in s.states:
                        job.request.inputs[st.input_name] = np.zeros_like(real[st.input_name])
        return jobs, None

    def _take(self, view: InstanceSlots, slot: Slot) -> Job:
        """Pop the front request of the slot's sequence into the batch, filling controls and state."""
        seq = slot.sequence
        assert seq is not None
        job, start, end, _ = seq.queue.popleft()
        inputs = job.request.inputs
        inputs.update(self._controls(start, end, True, seq.corrid))
        states = self.settings.states
        if states:
            if start or seq.state is None:
                seq.state = {st.input_name: st.initial for st in states}
            for st in states:
                value = seq.state[st.input_name]
                inputs[st.input_name] = value[None] if self.settings.max_batch_size > 0 else value
            wanted = job.request.requested_outputs
            if wanted is not None:
                job.request.requested_outputs = wanted + tuple(n for n in self._state_outputs if n not in wanted)
        seq.inflight = True
        view.running.append((job, seq))
        if end:
            self._release(slot)
        elif self.settings.iterative:  # the request runs to its end (its reschedules included): so does
            self._end(seq)             # its sequence, as when Triton's model releases it without RESCHEDULE
        return job

    def _end(self, seq: Sequence) -> None:
        self._finish(seq, Cancelled(f"sequence {seq.corrid} of model '{self.model_name}' ended (iterative_sequence) "
                                    "before this request ran"))

    def _finish(self, seq: Sequence, error: Cancelled) -> None:
        """Forget a sequence now: its queued requests fail with `error` (CANCELED), its slot is freed
        (or its place in the backlog dropped), and its id needs a new START."""
        if self._sequences.get(seq.corrid) is seq:
            del self._sequences[seq.corrid]
        while seq.queue:
            job = seq.queue.popleft()[0]
            if not job.cancelled():
                self._drop(job, error, "CANCELED")
        if seq.slot is not None:
            self._release(seq.slot)
        elif seq in self._backlog:
            self._backlog.remove(seq)

    def _fresh_id(self) -> int:
        with self._lock:
            while self._next_id in self._sequences:
                self._next_id += 1
            self._next_id += 1
            return self._next_id - 1

    def _null(self, representative: Job, inputs: dict[str, np.ndarray]) -> Job:
        """A row for a slot with nothing to run: another request's inputs, READY false (Triton's
        null request); its outputs go nowhere and statistics do not count it (`padding`)."""
        inputs.update(self._controls(False, False, False, None))
        request = InferenceRequest(inputs, 1, "", representative.request.requested_outputs)
        job = Job(request, None, representative.loop, perf_counter_ns())
        job.padding = True
        return job

    def _controls(self, start: bool, end: bool, ready: bool, corrid: int | str | None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for c in self.settings.controls:
            if c.kind == CORRID:
                if c.datatype == "BYTES":
                    value: Any = str(corrid or "").encode()
                else:
                    value = int(corrid or 0)
                out[c.name] = np.full(self._row, value, NUMPY_OF[c.datatype])
                continue
            flag = start if c.kind == START else end if c.kind == END else ready if c.kind == READY else False
            out[c.name] = np.full(self._row, c.false_true[1 if flag else 0], NUMPY_OF[c.datatype])
        return out

    def executed(self, view: InstanceSlots, outcomes: list[Outcome]) -> None:
        """The instance ran the batch `view.running` describes: keep each sequence's new state
        (and take it out of the response), and let the sequence run its next step."""
        with self._lock:
            for (_job, seq), (result, _) in zip(view.running, outcomes, strict=False):
                if seq is None:
                    continue
                seq.inflight = False
                if result is None or not self._state_outputs:
                    continue
                state = seq.state if seq.state is not None else {}
                for st in self.settings.states:
                    value = result.pop(st.output_name, None)
                    if value is not None:
                        state[st.input_name] = np.array(value[0] if self.settings.max_batch_size > 0 else value)
                seq.state = state
            view.running = []

    # -- slots, backlog, idle sequences (caller holds the lock) --

    def _assign(self, seq: Sequence, slot: Slot) -> None:
        seq.slot, slot.sequence = slot, seq
        slot.owner.cond.notify()

    def _release(self, slot: Slot) -> None:
        """Free the slot: the oldest backlogged sequence takes it (one with a cancelled request is
        dropped instead, as Triton does), else it joins the free slots."""
        seq = slot.sequence
        if seq is not None:
            seq.slot = None
        slot.sequence = None
        while self._backlog:
            waiting = self._backlog.popleft()
            if waiting.cancelled():
                self._cancel(waiting)
                continue
            waiting.deadline_ns = NO_DEADLINE
            self._assign(waiting, slot)
            return
        heapq.heappush(self._free, (slot.index, slot.owner.index, slot))

    def _cancel(self, seq: Sequence) -> None:
        """End a sequence one of whose requests was cancelled (client cancel or deadline): its slot
        is freed now, its other queued requests fail CANCELLED, and its id needs a new START."""
        log.info("sequence %s of model '%s': a request was cancelled; the sequence ends", seq.corrid,
                 self.model_name)
        self._finish(seq, Cancelled(f"a request of sequence {seq.corrid} to model '{self.model_name}' was "
                                    "cancelled; the sequence was ended"))

    def cancelled(self) -> None:
        """A request of this model was cancelled while it waited: end its sequence now rather than
        when it would have run (instances look at their slots; the backlog is looked at here)."""
        with self._lock:
            for seq in [seq for seq in self._backlog if seq.cancelled()]:
                self._cancel(seq)
            for view in self._views:
                view.cond.notify()

    def _reap_loop(self) -> None:
        idle = self.settings.idle_ns
        with self._lock:
            while not self._stopped:
                now = self._clock()
                wake = idle
                for corrid, seq in list(self._sequences.items()):
                    left = seq.seen_ns + idle - now
                    if left > 0:
                        wake = min(wake, left)
                    elif seq.slot is not None and not seq.queue and not seq.inflight:
                        log.info("sequence %s of model '%s' was idle longer than %d us: released", corrid,
                                 self.model_name, idle // 1000)
                        del self._sequences[corrid]
                        self._release(seq.slot)
                    else:  # queued, running or waiting for a slot: look again soon
                        wake = min(wake, 50_000_000)
                for seq in [seq for seq in self._backlog if seq.deadline_ns <= now]:
                    self._expire(seq)
                if self._backlog:
                    wake = min(wake, min(seq.deadline_ns for seq in self._backlog) - now)
                self._reaper_cond.wait(max(wake, 1_000_000) / 1e9)

    def _expire(self, seq: Sequence) -> None:
        """A backlogged sequence's `timeout` passed before it got a slot: Triton rejects all of it."""
        self._backlog.remove(seq)
        if self._sequences.get(seq.corrid) is seq:
            del self._sequences[seq.corrid]
        error = ServerUnavailable(TIMEOUT_MESSAGE)
        while seq.queue:
            job = seq.queue.popleft()[0]
            if not job.cancelled():
                self._drop(job, error, "REJECTED")

    def pending(self) -> int:
        with self._lock:
            seqs = [slot.sequence for view in self._views for slot in view.slots if slot.sequence is not None]
            return sum(len(seq.queue) for seq in seqs) + sum(len(seq.queue) for seq in self._backlog)

    def stop(self, instances: int = 0) -> None:
        """Refuse new requests; the instances run what their slots hold, then exit. Sequences
        still waiting for a slot never get one: their requests are answered UNAVAILABLE."""
        with self._lock:
            self._stopped = True
            error = ServerUnavailable(f"model '{self.model_name}' is unloading; the sequence never got a slot")
            while self._backlog:
                for job, *_ in self._backlog.popleft().queue:
                    job.loop.call_soon_threadsafe(_fail, job, error)
            for view in self._views:
                view.cond.notify_all()
            self._reaper_cond.notify_all()


def _drop(job: Job, error: NereidError, reason: str) -> None:
    job.loop.call_soon_threadsafe(_fail, job, error)


def _fail(job: Job, error: Exception) -> None:
    if job.future is not None and not job.future.done():
        job.future.set_exception(error)


def _shape_key(job: Job, names: tuple[str, ...]) -> tuple[Any, ...]:
    inputs = job.request.inputs
    return tuple(inputs[n].shape if n in inputs else None for n in names)
