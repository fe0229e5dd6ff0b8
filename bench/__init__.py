"""Kernel benchmark of LoRDS against bitsandbytes, cuBLAS, torch int4 and gemlite (see README.md)."""
