"""The built-in sinks, each an ordinary plugin registered through ``router_sink_types``."""
