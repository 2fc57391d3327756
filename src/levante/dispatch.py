"""The dispatcher: hands queued assignments to connected workers, under leases.

It keeps only connection state (which workers are attached, what each holds right
now); the queue itself lives in the store. Rules:
- An assignment goes only to a worker that declared its action, and a worker never
  holds more unfinished assignments than its capacity.
- Claiming is a store operation that leases the rows, so no assignment is handed out
  twice while its lease is live.
- When a worker's session ends, its leased (not deferred) assignments return to the
  queue; leases of workers that vanished with a previous engine process run out and
  are requeued by the lease timer.
- Workers are woken after the engine commits, never while a transaction is open.

The transport (a gRPC stream, or the in-process runner) supplies ``deliver``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field

from levante.core.model import AssignmentRecord, AssignmentState, Outcome
from levante.engine import Completion, Engine
from levante.errors import (
    ConflictError,
    InvalidArgumentError,
    LevanteError,
    NotFoundError,
    StoreError,
)
from levante.ids import AssignmentId
from levante.observability import metrics
from levante.store.base import Store, StoreTransaction

log = logging.getLogger("levante.dispatch")

DEFAULT_LEASE_SECONDS = 60.0
# The most results of one worker recorded in one transaction.
MAX_RESULTS_PER_TRANSACTION = 64
# How many transactions record one worker's results at once: a second batch can be
# decided while the first waits for its commit (PostgreSQL flushes its WAL then).
TRANSACTIONS_PER_WORKER = 2
# At shutdown, how long to wait for ended streams to hand back their unsent assignments.
DETACH_WAIT_SECONDS = 5.0


@dataclass(eq=False)
class WorkerSession:
    worker_id: str
    actions: frozenset[str]
    capacity: int
    deliver: Callable[[AssignmentRecord], Awaitable[None]]
    targets: frozenset[str] = frozenset()
    # Tell the worker an assignment it holds no longer counts (assignment id, reason).
    revoke: Callable[[AssignmentId, str], None] | None = None
    in_flight: set[AssignmentId] = field(default_factory=set)
    # Set when one of its leases ran out: it gets no new work until it is heard from.
    silent: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Slots promised to claims running inside result transactions (see Dispatcher.result).
    reserved: int = 0
    # Results waiting to be recorded (Dispatcher.results), the transactions recording
    # this worker's results now, and the recorder tasks among them.
    results: list[tuple[Completion, asyncio.Future[None]]] = field(default_factory=list)
    recording: int = 0
    recorders: set[asyncio.Task[None]] = field(default_factory=set)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        engine: Engine,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        poll_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        # Work queued by another engine process sharing the store is noticed by this
        # poll (one cheap read per interval); None when this process is the only one.
        self.poll_seconds = poll_seconds
        self._poller: asyncio.Task[None] | None = None
        self._engine = engine
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._sessions: dict[str, WorkerSession] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._lease_timer: asyncio.Task[None] | None = None
        self._presence: asyncio.Task[None] | None = None
        self._expired = 0
        self._draining = False  # shutting down: claim nothing, hand back only what was unsent
        self._handing_back = 0
        self._all_detached = asyncio.Event()

    # -- life cycle

    async def start(self) -> None:
        self._lease_timer = asyncio.create_task(self._expire_leases(), name="lease-timer")
        self._presence = asyncio.create_task(self._declare_presence(), name="presence")
        # Other engine processes' work wakes our workers at once where the store can say
        # so (PostgreSQL LISTEN/NOTIFY); the poll below stays as a safety net.
        self.subscribed = await self._store.subscribe(self.notify)
        if self.poll_seconds:
            self._poller = asyncio.create_task(self._poll(self.poll_seconds), name="poller")

    def drain(self) -> None:
        """Shutdown begins: no more work is claimed for anyone.

        Workers' results, deferrals and heartbeats are still heard while their streams
        last. When a stream ends, ``detach`` hands back only the assignments that were
        claimed for the worker but never sent: it may be running every other one, so
        those stay leased to it. The worker names what it still holds to the next
        engine it reaches (the rest are requeued then), or their leases run out.
        """
        self._draining = True

    async def close(self) -> None:
        if self._draining and (self._sessions or self._handing_back):
            # Streams cancelled by the server's stop detach after it returns: let them
            # hand back what they must while the store is still open.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_detached.wait(), DETACH_WAIT_SECONDS)
        tasks = [*self._pumps.values()]
        tasks += [t for t in (self._lease_timer, self._poller, self._presence) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pumps.clear()
        self._sessions.clear()

    @property
    def connected_workers(self) -> int:
        return len(self._sessions)

    # -- sessions

    async def attach(self, session: WorkerSession, holding: Collection[AssignmentId]) -> None:
        """A worker said hello. Assignments leased to it that it no longer holds are requeued."""
        if not session.actions:
            raise InvalidArgumentError("hello.actions: a worker must serve at least one action")
        if session.capacity < 1:
            raise InvalidArgumentError("hello.capacity: must be at least 1")
        if not session.worker_id:
            raise InvalidArgumentError("hello.worker_id: required")
        now = self._clock()
        await self._store.declare_actions(session.actions, now + self.lease_seconds, now)
        await self._store.clear_waiting_notes(session.actions)
        released = await self._store.release_assignments(session.worker_id, keep=holding)
        session.in_flight.update(holding)
        previous = self._sessions.get(session.worker_id)
        if previous is not None:
            self._stop_pump(previous)
        self._sessions[session.worker_id] = session
        self._pumps[session.worker_id] = asyncio.create_task(
            self._pump(session), name=f"pump-{session.worker_id}"
        )
        session.wake.set()
        if released:
            self.notify_all()
        log.info(
            "worker %s attached: actions=%s capacity=%d holding=%d",
            session.worker_id, sorted(session.actions), session.capacity, len(holding),
        )  # fmt: skip

    async def detach(self, session: WorkerSession, unsent: Collection[AssignmentId] = ()) -> None:
        """The worker's session ended: what it held goes back to the queue.

        ``unsent``: assignments the transport had not yet sent (see ``drain``).
        """
        if self._sessions.get(session.worker_id) is not session:
            return  # a newer session of the same worker took over
        del self._sessions[session.worker_id]
        self._stop_pump(session)
        if self._draining:
            self._handing_back += 1
            try:
                await self._hand_back(session, unsent)
            finally:
                self._handing_back -= 1
                if not self._sessions and not self._handing_back:
                    self._all_detached.set()
            return
        released = await self._store.release_assignments(session.worker_id)
        log.info("worker %s detached; %d assignments requeued", session.worker_id, released)
        await self._offline(session.actions)
        if released:
            self.notify_all()

    async def _hand_back(self, session: WorkerSession, unsent: Collection[AssignmentId]) -> None:
        """Shutting down: assignments never sent to the worker are tried again at once.

        Each one's lease is ended now and expired like a silent worker's (a new attempt
        is queued, announced to the other engines; a late result for the old attempt is
        refused as cancelled). Per assignment, so that nothing else leased to this
        worker id, perhaps by another engine it has already reached, is touched.
        """
        ids = [i for i in unsent if i in session.in_flight]
        if not ids:
            return
        try:
            await self._store.extend_leases(session.worker_id, ids, self._clock())
            for assignment_id in ids:
                await self._engine.expire_lease(assignment_id)
        except Exception:
            log.exception("worker %s: handing back %d unsent assignments failed; their "
                          "leases will run out", session.worker_id, len(ids))  # fmt: skip
            return
        metrics.redelivered(len(ids))
        log.info("worker %s: %d assignments never sent were handed back",
                 session.worker_id, len(ids))  # fmt: skip

    async def _offline(self, actions: Collection[str]) -> None:
        """Actions no worker attached here serves any more are offline (until a worker
        attached to any engine declares them again)."""
        served = self._served_actions()
        gone = [a for a in actions if a not in served]
        if gone:
            try:
                await self._store.actions_offline(gone, self._clock())
            except Exception:
                log.exception("marking actions offline failed")

    def _served_actions(self) -> set[str]:
        return {a for s in self._sessions.values() for a in s.actions}

    async def _declare_presence(self) -> None:
        """Keep the catalogue's online_until of the attached workers' actions ahead of
        the clock (a third of a lease at a time), for every engine to read."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            served = self._served_actions()
            if not served:
                continue
            try:
                now = self._clock()
                await self._store.declare_actions(served, now + self.lease_seconds, now)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("declaring the attached workers' actions failed; retrying")

    def _stop_pump(self, session: WorkerSession) -> None:
        pump = self._pumps.pop(session.worker_id, None)
        if pump is not None:
            pump.cancel()

    # -- waking

    def notify(self, actions: Collection[str]) -> None:
        """Assignments of these actions were queued (after a commit)."""
        for session in self._sessions.values():
            if not session.actions.isdisjoint(actions):
                session.wake.set()

    def voided(self, prefixes: Collection[str], reason: str) -> None:
        """Assignments under these id prefixes (an execution, a task) no longer count."""
        for session in self._sessions.values():
            for assignment_id in list(session.in_flight):
                if any(assignment_id == p or assignment_id.startswith((f"{p}.", f"{p}/", f"{p}#"))
                       for p in prefixes):  # fmt: skip
                    if session.revoke is not None:
                        session.revoke(assignment_id, reason)
                    self._settled(session, assignment_id)

    def notify_all(self) -> None:
        for session in self._sessions.values():
            session.wake.set()

    async def _pump(self, session: WorkerSession) -> None:
        while True:
            await session.wake.wait()
            session.wake.clear()
            free = self._free(session)
            if free <= 0 or session.silent or self._draining:
                continue
            try:
                claimed = await self._store.claim_assignments(
                    session.worker_id, session.actions, free,
                    self._clock() + self.lease_seconds, session.targets,
                )  # fmt: skip
            except Exception:
                log.exception("claiming work for worker %s failed; retrying", session.worker_id)
                await asyncio.sleep(0.5)
                session.wake.set()
                continue
            for assignment in claimed:
                session.in_flight.add(assignment.id)
                await session.deliver(assignment)
            if len(claimed) == free:
                session.wake.set()  # there may be more

    # -- what workers say

    def heard_from(self, session: WorkerSession) -> None:
        """The worker spoke: if its silence had cost it work, it may take work again."""
        if session.silent:
            session.silent = False
            session.wake.set()

    async def result(
        self, session: WorkerSession, assignment_id: AssignmentId, outcome: Outcome
    ) -> None:
        """Record one result the worker reported; raises what the engine refused it with."""
        [refused] = await self.results(session, [Completion(assignment_id, outcome)])
        if refused is not None:
            raise refused

    async def results(
        self, session: WorkerSession, completions: Sequence[Completion]
    ) -> list[LevanteError | None]:
        """Record results the worker reported; returns, per result, None or the error the
        engine refused it with (a StoreError: not recorded, the worker should resend).

        One worker's results are recorded by at most TRANSACTIONS_PER_WORKER
        transactions at a time. A caller that finds one free records its own at once, in
        its own task (a lone result, a chain's step, costs no hand-off); results that
        arrive while all are taken wait, and the next transaction takes all of them (up
        to MAX_RESULTS_PER_TRANSACTION), so a busy worker's results share commits and
        statements.
        """
        self.heard_from(session)
        loop = asyncio.get_running_loop()
        waiting = [(completion, loop.create_future()) for completion in completions]
        session.results.extend(waiting)
        if session.recording < TRANSACTIONS_PER_WORKER:
            session.recording += 1
            try:
                await self._record(session, _take_batch(session))
            finally:
                session.recording -= 1
                self._keep_recording(session)
        refused: list[LevanteError | None] = []
        for _, decided in waiting:
            try:
                await decided
                refused.append(None)
            except LevanteError as e:
                refused.append(e)
        return refused

    def _keep_recording(self, session: WorkerSession) -> None:
        """Results arrived while every transaction slot was taken: a task records them."""
        if session.results and session.recording < TRANSACTIONS_PER_WORKER:
            session.recording += 1
            recorder = asyncio.create_task(
                self._record_results(session), name=f"results-{session.worker_id}"
            )
            session.recorders.add(recorder)
            recorder.add_done_callback(session.recorders.discard)

    async def _record_results(self, session: WorkerSession) -> None:
        try:
            while session.results:
                await self._record(session, _take_batch(session))
        finally:
            session.recording -= 1

    async def _record(
        self, session: WorkerSession, batch: list[tuple[Completion, asyncio.Future[None]]]
    ) -> None:
        ids = {completion.assignment_id for completion, _ in batch}
        # The worker's next work is claimed in the transaction that records these
        # results (one commit instead of two); the slots are reserved so that its pump
        # cannot claim them meanwhile.
        slots = self._free(session) + len(ids & session.in_flight)
        if slots <= 0 or session.silent or self._draining:
            slots = 0
        claimed: list[AssignmentRecord] = []
        claim_ran = False

        async def claim_next(tx: StoreTransaction) -> list[str]:
            nonlocal claim_ran
            if self._sessions.get(session.worker_id) is session:
                claim_ran = True
                lease_until = self._clock() + self.lease_seconds
                claimed.extend(await tx.claim_assignments(
                    session.worker_id, session.actions, slots, lease_until, session.targets
                ))  # fmt: skip
            return [a.id for a in claimed]

        session.reserved += slots
        queue_empty = False
        try:
            refused = await self._engine.complete_many(
                [completion for completion, _ in batch], worker_id=session.worker_id,
                and_then=claim_next if slots else None,
            )  # fmt: skip
            # A claim that took fewer than it could found the queue empty for this
            # worker: its pump has nothing to do until new work is announced.
            queue_empty = claim_ran and len(claimed) < slots
        except BaseException as e:
            claimed.clear()  # rolled back with the transaction
            interrupted = StoreError("recording the result was interrupted; resend it")
            for _, decided in batch:
                _settle(decided, e if isinstance(e, Exception) else interrupted)
            if not isinstance(e, Exception):
                raise
            return
        finally:
            session.reserved -= slots
            for assignment_id in ids:
                self._settled(session, assignment_id, wake=not queue_empty)
        for (_, decided), error in zip(batch, refused, strict=True):
            _settle(decided, error)
        if claimed:
            await self._hand_over(session, claimed)

    def _free(self, session: WorkerSession) -> int:
        return session.capacity - len(session.in_flight) - session.reserved

    async def _hand_over(self, session: WorkerSession, claimed: list[AssignmentRecord]) -> None:
        """Deliver assignments claimed for ``session`` in a transaction that has committed."""
        current = self._sessions.get(session.worker_id)
        if current is None:  # the stream ended meanwhile: back to the queue
            if await self._store.release_assignments(session.worker_id):
                self.notify_all()
            return
        for assignment in claimed:
            current.in_flight.add(assignment.id)
            await current.deliver(assignment)

    async def defer(self, session: WorkerSession, assignment_id: AssignmentId) -> None:
        self.heard_from(session)
        try:
            held = await self._store.get_assignment(assignment_id)
            if held is not None and held.state == AssignmentState.LEASED and (
                held.worker_id not in (None, session.worker_id)
            ):  # the stores defer whoever asks: a worker may defer only what it holds
                raise ConflictError(
                    f"task_id '{assignment_id}' is held by another worker, not "
                    f"{session.worker_id}"
                )
            if not await self._store.defer_assignment(assignment_id, session.worker_id):
                found = await self._store.get_assignment(assignment_id)
                if found is None:
                    raise NotFoundError(f"task_id '{assignment_id}' not found")
                if found.state != AssignmentState.DEFERRED:
                    raise ConflictError(
                        f"task_id '{assignment_id}' cannot be deferred: it is {found.state.value}"
                    )
        finally:
            self._settled(session, assignment_id)

    async def heartbeat(self, session: WorkerSession, ids: Collection[AssignmentId]) -> None:
        self.heard_from(session)
        await self._store.extend_leases(
            session.worker_id, ids, self._clock() + self.lease_seconds
        )

    def _settled(
        self, session: WorkerSession, assignment_id: AssignmentId, wake: bool = True
    ) -> None:
        if assignment_id in session.in_flight:
            session.in_flight.discard(assignment_id)
            if wake:
                session.wake.set()

    async def _poll(self, interval: float) -> None:
        """Wake workers for work that other engine processes queued."""
        while True:
            await asyncio.sleep(interval)
            try:
                if self._sessions:
                    actions = await self._store.queued_action_names()
                    if actions:
                        self.notify(actions)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("polling the queue failed; retrying")

    # -- leases

    async def _expire_leases(self) -> None:
        """A durable timer: sleeps until the earliest lease runs out, then requeues."""
        while True:
            try:
                due = await self._store.next_lease_expiry()
                now = self._clock()
                delay = self.lease_seconds if due is None else max(0.0, due - now)
                await asyncio.sleep(min(delay, self.lease_seconds))
                for assignment in await self._store.expired_leases(self._clock(), 100):
                    holder = self._sessions.get(assignment.worker_id or "")
                    if holder is not None:
                        holder.silent = True
                    log.warning("assignment %s: the lease of worker %s ran out; trying again",
                                assignment.id, assignment.worker_id, extra={
                                    "task_id": assignment.id, "worker_id": assignment.worker_id,
                                })  # fmt: skip
                    await self._engine.expire_lease(assignment.id)
                    self._expired += 1
                    metrics.lease_expired()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("lease timer failed; retrying")
                await asyncio.sleep(1.0)


def _take_batch(session: WorkerSession) -> list[tuple[Completion, asyncio.Future[None]]]:
    batch = session.results[:MAX_RESULTS_PER_TRANSACTION]
    del session.results[:MAX_RESULTS_PER_TRANSACTION]
    return batch


def _settle(decided: asyncio.Future[None], error: BaseException | None) -> None:
    """Resolve a result's future; an error nobody awaits any more is not logged as lost."""
    if decided.done():
        return
    if error is None:
        decided.set_result(None)
    else:
        decided.set_exception(error)
        decided.exception()  # retrieved: the caller may have stopped waiting
