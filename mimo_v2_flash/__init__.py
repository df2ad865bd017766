"""MiMo-V2-Flash: config, NumPy reference, model, KV cache and generation."""
