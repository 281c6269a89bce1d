"""Group commit for single consumes: the requests a process's threads make while one
consume statement is in flight are combined into the next one (consume_group.sql).

Each consume costs PostgreSQL a whole statement and commit of its own; inside one
set-based statement an item costs a tenth of that (bench/README.md). Under threaded
workers (gunicorn gthread, consensus_tokens/gunicorn.conf.py) a process serves many
requests at once, so a consume that arrives while another is being written can wait
for that write and then go with the others that arrived meanwhile, in one statement.

Leader/follower, no thread of its own: a request that finds nothing in flight becomes
the leader and writes at once (a lone request never waits for company: one item goes
through the single statement, consume_single.sql). Requests arriving while it writes
queue up as followers and sleep. When the write is done the leader hands each item its
answer, passes the queue to its first follower as the next group, and returns; that
follower writes the group on its own connection, and so on. Every request thread still
waits for its own row's commit before it answers.

What a group leaves undecided (a cap, an alert threshold, a replay: see the .sql) comes
back as None, and the caller's dispatcher sends it through the ORM path, which answers
it as it answers everything the single statement leaves. If the group's statement
fails, every item is sent back to be done alone (the usual path, with its own error
handling); nothing was recorded, or it was and the retry replays it per operation id.
"""
from __future__ import annotations

import threading
from typing import Callable

from consensus_tokens import metrics

from ..context import RequestContext
from .contract import MAX_BATCH, ConsumeRequest, ConsumeResult

# What an item's slot holds until it is decided, and when its group failed.
_PENDING, _ALONE = object(), object()


class _Item:
    __slots__ = ("request", "ctx", "answer", "group", "woken")

    def __init__(self, request: ConsumeRequest, ctx: RequestContext) -> None:
        self.request, self.ctx = request, ctx
        self.answer: object = _PENDING
        self.group: list[_Item] | None = None  # set when this item's thread is to lead that group
        self.woken = threading.Event()


Group = list[tuple[ConsumeRequest, RequestContext]]


class Combiner:
    """One per process (COMBINER below). `single` writes one item, `group` several; both
    return each item's ConsumeResult or None (left to the ORM path) and may raise."""

    def __init__(self, *, single: Callable[[ConsumeRequest, RequestContext], ConsumeResult | None],
                 group: Callable[[Group], list[ConsumeResult | None]], max_group: int = MAX_BATCH) -> None:
        self._single, self._group, self._max_group = single, group, max_group
        self._lock = threading.Lock()
        self._queue: list[_Item] = []
        self._writing = False  # a leader is writing (or about to): newcomers queue
        # how much combining happened (tests; metrics count the same): groups written, their
        # items, and how many of those the group's statement recorded (the rest went alone)
        self.groups = self.items = self.recorded = 0

    @property
    def queued(self) -> int:
        """How many requests wait for the write in flight."""
        return len(self._queue)

    def consume(self, request: ConsumeRequest, ctx: RequestContext) -> ConsumeResult | None:
        """This item's answer; None when the caller must take it through the ORM path.
        Raises only what writing it alone raised."""
        item = _Item(request, ctx)
        with self._lock:
            lead = not self._writing
            if lead:
                self._writing = True
            else:
                self._queue.append(item)
        if lead:
            group = [item]
        else:
            item.woken.wait()
            if item.group is None:
                return self._answer(item)
            group = item.group
        try:
            self._write(group)
        finally:
            self._hand_over()
        return self._answer(item)

    def _answer(self, item: _Item) -> ConsumeResult | None:
        answer = item.answer
        if answer is _ALONE:
            return self._single(item.request, item.ctx)
        if isinstance(answer, BaseException):
            raise answer
        return answer  # type: ignore[return-value]

    def _write(self, group: list[_Item]) -> None:
        """Decide every item of the group (the first is this thread's own) and wake the
        others, whatever happens."""
        try:
            if len(group) == 1:
                # The lone request: the single statement, at once, while newcomers queue.
                try:
                    group[0].answer = self._single(group[0].request, group[0].ctx)
                except Exception as error:
                    group[0].answer = error
                return
            try:
                answers = self._group([(item.request, item.ctx) for item in group])
            except Exception:
                answers = [_ALONE] * len(group)
            self.groups += 1
            self.items += len(group)
            self.recorded += sum(answer is not None and answer is not _ALONE for answer in answers)
            metrics.consume_groups.inc()
            metrics.consume_grouped.inc(len(group))
            for item, answer in zip(group, answers):
                item.answer = answer
        finally:
            for item in group[1:]:
                if item.answer is _PENDING:
                    item.answer = _ALONE
                item.woken.set()

    def _hand_over(self) -> None:
        """Pass what queued meanwhile to its first item's thread as the next group, or
        stand down. Items of one (user, operation id) never share a group: a later one
        waits for the next (it will be a replay of the first, or its conflict)."""
        with self._lock:
            if not self._queue:
                self._writing = False
                return
            group: list[_Item] = []
            seen: set[tuple[int, str]] = set()
            rest: list[_Item] = []
            for item in self._queue:
                key = (item.request.user_id, item.request.operation_id)
                if key in seen or len(group) >= self._max_group:
                    rest.append(item)
                else:
                    seen.add(key)
                    group.append(item)
            self._queue = rest
        group[0].group = group
        group[0].woken.set()
