"""NKI kernels for MiMo-V2-Flash on Trainium2, and the CPU simulator they are tested on."""
