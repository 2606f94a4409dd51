"""Simulation: the forward model (project, simulate) and calibration exposures (arcs, flats)."""
