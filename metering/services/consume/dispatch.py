"""The consume's entry points: the PostgreSQL statements when they apply, else the ORM
path, which answers everything they leave (and answers alike)."""
from __future__ import annotations

from django.conf import settings
from django.db import connection

from ..context import RequestContext
from .combiner import Combiner
from .contract import BatchItemResult, ConsumeRequest, ConsumeResult, tokens_check
from .orm import consume_batch_orm, consume_orm
from .postgres import consume_batch_fast, consume_fast, consume_group_fast

# This process's combiner: the direct consumes its threads make at once share a statement.
COMBINER = Combiner(single=lambda request, ctx: consume_fast(request=request, ctx=ctx), group=consume_group_fast)


def usage_consume(*, request: ConsumeRequest, ctx: RequestContext) -> ConsumeResult:
    """Record what an operation spent, exactly once per (user, operation id)."""
    tokens_check(request.tokens)
    if settings.METERING_FAST_PATH and not request.reservation_id and connection.vendor == "postgresql":
        if settings.METERING_GROUP_COMMIT and not connection.in_atomic_block:
            result = COMBINER.consume(request, ctx)  # its commit is not the caller's to make
        else:
            result = consume_fast(request=request, ctx=ctx)
        if result is not None:
            return result
    return consume_orm(request=request, ctx=ctx)


def usage_consume_batch(*, requests: list[ConsumeRequest], ctx: RequestContext) -> list[BatchItemResult]:
    """Record up to MAX_BATCH operations at once: all or nothing, each exactly once."""
    if settings.METERING_FAST_PATH and connection.vendor == "postgresql":
        results = consume_batch_fast(requests=requests, ctx=ctx)
        if results is not None:
            return results
    return consume_batch_orm(requests=requests, ctx=ctx)
