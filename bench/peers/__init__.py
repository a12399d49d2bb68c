"""Peer servers the benchmark compares wscluster with (started as child processes)."""
