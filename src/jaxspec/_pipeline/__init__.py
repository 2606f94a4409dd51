"""Pipeline: the one frame job, the batch runner, devices and MPI ranks (mpi4py and mpi4jax only here, lazily)."""
