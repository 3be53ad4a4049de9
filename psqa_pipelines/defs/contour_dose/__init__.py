"""Contouring + dose domain (seed 002, CTAN): cases -> split -> cache -> models -> evaluation -> exports."""
