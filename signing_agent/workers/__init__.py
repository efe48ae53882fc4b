"""Crypto worker processes: ECDSA signing (file keys) and the mandatory verification, off the event loop.

``cryptography`` keeps the GIL while it signs and verifies, so on the event loop's thread every signature stalls
every request. A ``CryptoPool`` (``pool.py``, in the daemon) sends jobs to a few child processes (``child.py``, one
per core beyond the event loop's by default), batched: all the jobs one turn of the event loop made go to a worker as
one frame (``frames.py``), and come back as one. A worker holds the file keys the daemon handed it over its private
pipe, never reads a file, never logs a job, and exits when the daemon closes the pipe (or dies).
"""
