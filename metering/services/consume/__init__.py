"""Consuming tokens, single and batch: one contract (contract.py: request, result,
limits, the answer body), two engines that import it and never each other - the ORM
path (orm.py) and the PostgreSQL statements (postgres.py, with the .sql files beside
it) - and the dispatcher that picks one (dispatch.py).

metering.services re-exports the public names. This file imports nothing, so that
reading the contract (usage.py's Usage does) never loads the engines.
"""
