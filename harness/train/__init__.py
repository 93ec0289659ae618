"""``caplab train``: data-parallel SGD over the two stores, in three consistency models.

BSP (bulk synchronous, over raft), ASP (asynchronous parameter server, over gossip) and
SSP (stale synchronous parallel, over raft), each clean, with a straggler and through a
partition. Modules: :mod:`~harness.train.data` (the digits), :mod:`~harness.train.model`
(softmax regression in numpy), :mod:`~harness.train.protocol` (what the workers keep in the
store), :mod:`~harness.train.worker` (one worker process), :mod:`~harness.train.run` (the
experiments and the command line), :mod:`~harness.train.report` (the report).
"""
