# shardct's process runtime: CLI, config files, capture I/O, supervisor, dispatcher,
# workers and ZeroMQ transport. The only package that touches the OS.
"""The shardct runtime (everything with processes, sockets, files and clocks)."""
