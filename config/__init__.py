"""config: the control plane (resources, store, CA, config push) and the `ambit` CLI."""
