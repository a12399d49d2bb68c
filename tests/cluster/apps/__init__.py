"""Applications loaded by test node processes (``--app tests.cluster.apps.<module>:app``)."""
