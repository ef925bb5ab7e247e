"""Where and how work runs: devices and dtypes, several processes, memory planning, whether the hub answers."""
