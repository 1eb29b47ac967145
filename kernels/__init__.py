"""Triton kernels of dalle_fast (installed as dalle_fast.kernels): @triton.jit code only.

Launchers, validation, custom-op registration and dispatch live in dalle_fast.ops.
"""
