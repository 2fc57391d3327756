"""Test support: real `levante serve` and `levante worker` processes on 127.0.0.1."""
