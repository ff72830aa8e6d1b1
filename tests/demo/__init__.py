"""The demo behind the README's main command, ``nox -s demo`` (``python -m tests.demo``).

On one machine, all on 127.0.0.1: an origin registry (the CNCF distribution registry when it is
installed, else a small built-in read-only origin), one ``p2p-tracker``, two ``p2p-proxy`` and six
``p2p-agent`` processes. A demo image of several hundred MB is built, pushed to the origin, and
pulled through every agent at once with live progress; every pulled blob is verified and a summary
shows how many bytes left the origin (about one image, not one per agent).

Modules:

- :mod:`tests.demo.image`: the deterministic demo image, written as an OCI image layout;
- :mod:`tests.demo.origin`: the built-in origin (hypercorn on trio) and the distribution registry;
- :mod:`tests.demo.cluster`: the tracker, proxy and agent processes (configs, readiness, stop);
- :mod:`tests.demo.pull`: the OCI pull client that pulls through each agent;
- :mod:`tests.demo.progress`: the live progress display;
- :mod:`tests.demo.report`: agent metrics and the summary;
- :mod:`tests.demo.main`: the command line and the run itself.
"""
