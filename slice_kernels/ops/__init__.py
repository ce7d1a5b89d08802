"""Fused ops. Each module holds one op with all of its implementations side by side: the torch reference
(also the portable fallback), the Triton kernel, and thin wrappers over the native extension, registered with
``slice_kernels.dispatch``."""
