"""``im bench``: the load generator every performance figure of this project is measured with.

Built on the SDK (:mod:`im.client`): accounts and groups through :class:`~im.client.ApiClient`, the hot
path on :class:`~im.client.ClientSession` + :class:`~im.client.Transport` (WebSocket or TCP).

Modules:

- :mod:`im.bench.cli`       the ``im bench`` and ``im bench idle`` command lines
- :mod:`im.bench.load`      a load run: accounts, client processes, CPU readings, results
- :mod:`im.bench.worker`    one client process (closed loop with a window, or a fixed rate)
- :mod:`im.bench.anomalies` the delivery checker: lost, duplicated, out-of-order messages
- :mod:`im.bench.idle`      idle connections and the server's memory per connection
- :mod:`im.bench.server`    spawning ``python -m im serve``; CPU and memory from /proc
- :mod:`im.bench.report`    the table, ``--json`` and ``--png``
"""
