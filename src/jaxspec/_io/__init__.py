"""Files: the one atomic writer, DESI preproc and frame files, mask bits, barycentric correction (no JAX)."""
