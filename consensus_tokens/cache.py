"""Django's Redis cache backend, keeping one redis.Redis client per connection pool.

Django builds a new redis.Redis object on every cache call (its constructor fills a
table of response callbacks) each time, most of what a cached estimate costs
(bench/README.md). The client is thread-safe and the pool it wraps
reconnects after a fork, so one per pool is enough."""
from __future__ import annotations

from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient


class ReusedClientRedisCacheClient(RedisCacheClient):
    def get_client(self, key=None, *, write=False):
        index = self._get_connection_pool_index(write)
        clients = self.__dict__.setdefault("_reused_clients", {})
        client = clients.get(index)
        if client is None:
            client = clients[index] = self._client(connection_pool=self._get_connection_pool(write))
        return client


class RedisCache(DjangoRedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = ReusedClientRedisCacheClient
