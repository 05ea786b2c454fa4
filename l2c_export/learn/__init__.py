"""Learning the routers: Learning-to-Cache's objective on a model's own sampling trajectories."""
