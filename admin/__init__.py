"""bgproxy control plane: admin API, CLI, demo and the serve runner."""
